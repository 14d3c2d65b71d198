"""Rank functions of the packed-document tests (module level: ``run_distributed`` spawns them).

The reference for a packed row is each of its documents run on its own: a row holding only that
document at positions 0..n-1, causal attention, padding after it with no loss (causal attention keeps
the padding out of the document's outputs). Both sides go through megatron-core's schedules with the
same token count, so the loss sums and the per-token-normalized gradients must agree.
"""
from __future__ import annotations

import os
import tempfile
from functools import partial

import numpy as np
import torch

SEQ = 64
LENGTHS = [(20, 25), (15, 30)]  # two packed rows of two documents each (plus padding)


def tiny_overrides(extra=()) -> list[str]:
    return ["--data.mock", "true", "--data.seq_length", str(SEQ), "--model.preset", "tiny",
            "--training.train_steps", "1", "--training.micro_batch_size", "1",
            "--training.global_batch_size", "2", "--training.eval_interval", "0",
            "--schedule.warmup_steps", "0", "--logging.tensorboard", "false",
            "--logging.output_dir", os.path.join(tempfile.gettempdir(), "bluelm_tests", "packed"),
            "--model.backend", "torch"] + list(extra)


def documents(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(5, 4000, (n,), generator=gen) for n in row] for row in LENGTHS]


def packed_batch(docs, pad: int = 0) -> dict:
    """One packed row of ``docs``, made by the SFT packer (every token learned, as pretraining text)."""
    from megatron_bluelm.data.sft_packing import build_row

    row = build_row([(d.numpy(), np.ones(len(d), np.float32)) for d in docs], SEQ, pad)
    return {k: v[None] for k, v in row.items()}


def alone_batch(doc, pad: int = 0) -> dict:
    tokens = torch.full((SEQ + 1,), pad)
    tokens[:len(doc)] = doc
    mask = torch.zeros(SEQ)
    mask[:len(doc) - 1] = 1
    return {"tokens": tokens[None, :-1], "labels": tokens[None, 1:], "loss_mask": mask[None],
            "position_ids": torch.arange(SEQ)[None], "attention_mask": None}


def full_grads(model) -> dict:
    """{global name: full gradient} from the DDP main_grad buffers of every layout (via gather)."""
    from megatron_bluelm.parallel.gather import full_state_dict

    params = [p for chunk in model for p in chunk.parameters()]
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.main_grad.view_as(p).to(p.dtype)
        return full_state_dict(model)
    finally:
        for p, d in zip(params, saved):
            p.data = d


def stack_rows(batches) -> dict:
    """One micro-batch of the given one-row batches."""
    return {k: None if batches[0][k] is None else torch.cat([b[k] for b in batches]) for k in batches[0]}


def _grads_and_loss(run, batches, seq: int = SEQ, mbs: int = 1) -> dict:
    from megatron.core import parallel_state

    from megatron_bluelm.training import step

    for chunk in run.model:
        chunk.zero_grad_buffer()
    folded = []
    step.ROW_FOLDING = True  # also on CPU (by default only CUDA folds: its attention costs Σ len²)
    original = step.fold_rows
    def recording(batch):
        out = original(batch)
        folded.append(tuple(out["tokens"].shape))
        return out

    step.fold_rows = recording
    try:
        reports = step._run_schedule(run.model, [iter(list(batches)) for _ in run.model], False,
                                     num_microbatches=len(batches), seq_length=seq, micro_batch_size=mbs,
                                     device=run.info.device)
    finally:
        step.fold_rows, step.ROW_FOLDING = original, None
    total = sum((r["lm loss"].double().cpu() for r in reports), torch.zeros(2, dtype=torch.float64))
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    return {"loss_sum": float(total[0]) if last else None, "tokens": int(total[1]) if last else None,
            "grads": full_grads(run.model), "folded": folded}


def packed_vs_alone(extra: list[str]) -> dict:
    """Gradients and loss of the packed rows and of their documents alone, in the given layout."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training.loop import prepare_config, setup_run

    cfg = load_config(None, tiny_overrides(["--data.reset_position_ids", "true",
                                            "--data.reset_attention_mask", "true", *extra]))
    prepare_config(cfg)
    vocab = cfg.model.vocab_size or load_tokenizer(cfg.data.tokenizer_model).vocab_size
    run = setup_run(cfg, partial(build_decoder, cfg, vocab), 0.0)
    try:
        rows = documents()
        packed = _grads_and_loss(run, [packed_batch(r) for r in rows])
        # both rows in one micro-batch (two micro-batches, the rows swapped in the second: virtual
        # stages need as many as there are stages): the step folds each into one row of 2 * SEQ
        # (training/step.py); every token counts twice, so the token-mean gradients are the same
        pair = [packed_batch(r) for r in rows]
        two_rows = _grads_and_loss(run, [stack_rows(pair), stack_rows(pair[::-1])], mbs=2)
        alone = _grads_and_loss(run, [alone_batch(d) for r in rows for d in r])
        return {"packed": packed, "two_rows": two_rows, "alone": alone}
    finally:
        teardown()
