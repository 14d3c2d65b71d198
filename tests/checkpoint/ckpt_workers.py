"""Rank functions of the checkpoint tests (module level: ``run_distributed`` pickles them by name)."""
from __future__ import annotations

import os
import signal


def tiny_overrides(data_prefix: str, out: str, *, steps: int = 6, tp: int = 1, pp: int = 1,
                   distopt: bool = False, save: str | None = None, load: str | None = None,
                   save_interval: int = 0) -> list[str]:
    """A 6-step tiny run whose LR schedule does not depend on where it stops (decay_steps fixed)."""
    args = ["--data.prefix", data_prefix, "--data.seq_length", "64", "--data.cache_dir", f"{out}/cache",
            "--training.train_steps", str(steps), "--training.eval_interval", "0",
            "--schedule.warmup_steps", "2", "--schedule.decay_steps", "6",
            "--logging.log_interval", "1", "--logging.tensorboard", "false", "--logging.output_dir", f"{out}/log",
            "--parallel.tp", str(tp), "--parallel.pp", str(pp),
            "--parallel.distributed_optimizer", str(distopt).lower(),
            "--checkpoint.save_interval", str(save_interval)]
    if save:
        args += ["--checkpoint.save", save]
    if load:
        args += ["--checkpoint.load", load]
    return args


def pretrain(overrides: list[str], preempt_at: int | None = None) -> dict:
    """Run the pretrain stage; returns losses, step and the full trained parameters (every rank).

    ``preempt_at``: rank 0 sends itself SIGUSR1 at that step's end (the other ranks learn of it through
    the checkpointer's all-reduce), as a cluster scheduler would before preempting the job."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.parallel.gather import full_state_dict
    from megatron_bluelm.stages.pretrain import run_pretrain
    from megatron_bluelm.training import checkpointing

    if preempt_at is not None:
        original = checkpointing.Checkpointer.on_step_end

        def on_step_end(self, run):
            if run.step == preempt_at and int(os.environ["RANK"]) == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            original(self, run)

        checkpointing.Checkpointer.on_step_end = on_step_end
    result = run_pretrain(load_config(None, overrides), collect=lambda run: full_state_dict(run.model))
    return {"losses": result["losses"], "step": result["step"], "consumed": result["consumed_samples"],
            "params": result["collected"]}


def pretrain_phases(phases: list[tuple[list[str], int]]) -> list[dict]:
    """``pretrain`` once per ``(overrides, port)`` in this same set of ranks, one after the other (each
    run sets up and tears down its own process group, on its own port): several resumes for the
    price of one process start."""
    results = []
    for overrides, port in phases:
        os.environ["MASTER_PORT"] = str(port)
        results.append(pretrain(overrides))
    return results


def fixed_batch_loss(run, micro_batches: int = 2, mbs: int = 2, seq: int = 64) -> float | None:
    """Mean token loss of one fixed synthetic global batch through the pipeline (None off the last stage)."""
    import torch

    from megatron_bluelm.training.step import eval_step

    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(micro_batches):
        tokens = torch.randint(0, 4000, (mbs, seq + 1), generator=gen)
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(mbs, seq),
                        "position_ids": torch.arange(seq).expand(mbs, seq), "attention_mask": None})
    iterators = [iter(list(batches)) for _ in run.model]
    res = eval_step(run.model, iterators, num_microbatches=micro_batches, seq_length=seq, micro_batch_size=mbs,
                    device=run.info.device)
    return res.loss


def loaded_loss(overrides: list[str]) -> float | None:
    """Load a checkpoint into the configured layout (no training) and return ``fixed_batch_loss``."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.stages.pretrain import run_pretrain

    return run_pretrain(load_config(None, overrides), collect=fixed_batch_loss)["collected"]


def megatron_logits(load: str, token_ids: list[int]):
    """Logits [s, vocab] of our model (TP1, from any checkpoint layout) for one sequence."""
    import torch

    from megatron_bluelm.convert import megatron_io
    from megatron_bluelm.training.checkpointing import read_meta, resolve_checkpoint

    path, _ = resolve_checkpoint(load)
    cfg = megatron_io.run_config_from_meta(read_meta(path))
    megatron_io.start_single_process()
    from megatron_bluelm.data.tokenizer import load_tokenizer

    model = megatron_io.build_model(cfg, cfg.model.vocab_size or load_tokenizer(cfg.data.tokenizer_model).vocab_size)
    megatron_io.load_full(model, path)
    model.eval()
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None], None)
    return logits[0].float()


def convert(direction: str, src: str, out: str):
    """tools/convert_checkpoint.py's functions in a fresh process (each needs its own process group)."""
    from megatron_bluelm.convert.api import hf_to_megatron, megatron_to_hf

    return megatron_to_hf(src, out) if direction == "to_hf" else hf_to_megatron(src, out)


def same_model(a: str, b: str) -> bool:
    """Whether the newest complete checkpoints under ``a`` and ``b`` hold bit-identical weights."""
    import torch

    from megatron_bluelm.convert import megatron_io
    from megatron_bluelm.training.checkpointing import read_meta, resolve_checkpoint

    megatron_io.start_single_process()
    states = []
    for root in (a, b):
        path, _ = resolve_checkpoint(root)
        cfg = megatron_io.run_config_from_meta(read_meta(path))
        states.append(megatron_io.load_full(megatron_io.build_model(cfg, 8192), path))
    return states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def greedy_generate(load: str, prompts: list, max_new_tokens: int, tp: int = 1):
    """Our KV-cache greedy generation from a checkpoint (no stop tokens: full length)."""
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.inference.engine import TextGenerator
    from megatron_bluelm.inference.loading import checkpoint_run_config, load_weights
    from megatron_bluelm.inference.model import build_inference_model
    from megatron_bluelm.parallel.setup import teardown

    cfg = checkpoint_run_config(load)
    cfg.parallel.tp = tp
    tok = load_tokenizer(cfg.data.tokenizer_model)
    im = build_inference_model(cfg, tok.vocab_size)
    try:
        load_weights([im.model], load)
        gen = TextGenerator(im, tok)
        outs = gen.generate_ids([tok.encode(p) for p in prompts], gen.request(max_new_tokens=max_new_tokens,
                                                                               stop_tokens=[]))
        return [o.tokens for o in outs]
    finally:
        teardown()


def pretrain_synced(overrides: list[str]) -> dict:
    """``pretrain`` returning, after the final save, the weights every rank really holds (read once the
    pending ``overlap_param_gather`` all-gather is finished) and the checkpoint's weights loaded alone
    into a fresh TP1 model (same process group)."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.convert import megatron_io
    from megatron_bluelm.parallel.gather import full_state_dict
    from megatron_bluelm.stages.pretrain import run_pretrain
    from megatron_bluelm.training.checkpointing import finish_param_gather, read_meta, resolve_checkpoint

    def collect(run):
        finish_param_gather(run.model)
        live = full_state_dict(run.model)
        path, _ = resolve_checkpoint(run.cfg.checkpoint.save)
        fresh = megatron_io.build_model(megatron_io.run_config_from_meta(read_meta(path)), 8192)
        return live, megatron_io.load_full(fresh, path)

    result = run_pretrain(load_config(None, overrides), collect=collect)
    live, saved = result["collected"]
    return {"live": live, "saved": saved}


def pretrain_nan_grad(overrides: list[str], nan_at: int) -> dict:
    """``pretrain`` with one NaN written into rank 0's reduced gradients of step ``nan_at`` (the loss
    of that step stays finite): what a bad batch or an overflow does to a real run."""
    from megatron_bluelm.training import step as step_mod

    original, calls = step_mod.finalize_model_grads, [0]

    def poisoned(model, *args, **kwargs):
        out = original(model, *args, **kwargs)
        calls[0] += 1
        if calls[0] == nan_at and int(os.environ["RANK"]) == 0:
            param = next(p for p in model[0].parameters() if p.requires_grad)
            param.main_grad.view(-1)[0] = float("nan")
        return out

    step_mod.finalize_model_grads = poisoned
    return pretrain(overrides)

