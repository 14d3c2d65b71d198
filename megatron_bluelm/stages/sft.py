"""Supervised fine-tuning (chat, thinking / non-thinking) of the BlueLM decoder.

    python tools/preprocess_data.py --chat --input chats.jsonl --output-prefix data/sft \\
        --tokenizer-model TOK.model --think-ratio 0.7 --budget-ratio 0.2
    torchrun --nproc-per-node 4 -m megatron_bluelm.stages.sft --config examples/sft_tiny.yaml \\
        --pretrained outputs/pretrain/ckpt --parallel.tp 2 --parallel.pp 2

The shared training loop (training/loop.py) with packed SFT rows (data/sft_packing.py): masked loss
on assistant tokens, positions restarting and attention blocked per sample. ``--pretrained`` loads the
model weights of a pretrain checkpoint (any layout; optimizer and step start fresh);
``checkpoint.save`` / ``checkpoint.load`` save and resume the SFT run itself, as in pretraining.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Callable, Optional, Sequence

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.loader import load_config
from megatron_bluelm.config.schema import RunConfig


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[RunConfig, Optional[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML recipe (examples/sft_tiny.yaml)")
    ap.add_argument("--pretrained", default=None, help="pretrain checkpoint directory to start from")
    args, overrides = ap.parse_known_args(argv)
    return load_config(args.config, overrides), args.pretrained


def sft_config(cfg: RunConfig) -> RunConfig:
    """Packing needs per-sample positions and attention: both are switched on for SFT."""
    cfg.data.reset_position_ids = True
    cfg.data.reset_attention_mask = True
    return cfg


def _load_pretrained(run, path: str) -> None:
    from megatron_bluelm.inference.loading import load_weights

    loaded = load_weights(run.model, path)
    run.optimizer.reload_model_params()  # the optimizer's main copies follow the loaded weights
    run.logger.print(f"loaded pretrained weights from '{loaded}'")


def run_sft(cfg: RunConfig, pretrained: Optional[str] = None, collect: Optional[Callable] = None) -> dict:
    """Validate, build, (load pretrained weights,) train; returns the run summary on every rank."""
    from megatron_bluelm.data import build_data_iterator, load_tokenizer
    from megatron_bluelm.data.sft_packing import build_sft_datasets
    from megatron_bluelm.models.counting import DecoderShape, train_flops_per_token
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.stages.pretrain import _dp_rank
    from megatron_bluelm.training.checkpointing import Checkpointer, Preempted
    from megatron_bluelm.training.loop import prepare_config, setup_run, summary, train

    cfg = sft_config(cfg)
    dp = prepare_config(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    flops = train_flops_per_token(DecoderShape.from_model_config(cfg.model, vocab), cfg.data.seq_length)
    run = setup_run(cfg, partial(build_decoder, cfg, vocab), flops)
    try:
        t = cfg.training
        evals = (t.train_steps // t.eval_interval + 1) if t.eval_interval else 0
        num_samples = (t.train_steps * t.global_batch_size, max(evals, 1) * t.eval_steps * t.global_batch_size,
                       t.eval_steps * t.global_batch_size)
        train_ds, valid_ds, _ = build_sft_datasets(cfg.data, tokenizer, seq_length=cfg.data.seq_length,
                                                   num_samples=num_samples, seed=t.seed)

        def iterators(dataset, consumed):
            return [build_data_iterator(dataset, micro_batch_size=t.micro_batch_size, consumed_samples=consumed,
                                        dp_rank=_dp_rank(), dp_size=dp) for _ in range(cfg.parallel.vpp or 1)]

        checkpointer = Checkpointer(run)
        checkpointer.maybe_resume()
        if pretrained and run.step == 0:  # a resumed SFT run already holds fine-tuned weights
            _load_pretrained(run, pretrained)
        try:
            train(run, partial(iterators, train_ds), partial(iterators, valid_ds) if valid_ds else None,
                  on_step_end=checkpointer.on_step_end)
        except Preempted as stop:
            run.logger.print(str(stop))
        checkpointer.finish()
        result = summary(run)
        if collect is not None:
            result["collected"] = collect(run)
        return result
    finally:
        run.logger.close()
        teardown()


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        cfg, pretrained = parse_args(argv)
        run_sft(cfg, pretrained)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
