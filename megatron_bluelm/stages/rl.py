"""RL stage: GRPO on the megatron model (TP / PP / DP), rollouts with our KV-cache generation.

    torchrun --nproc-per-node 2 -m megatron_bluelm.stages.rl --config examples/rl_toy.yaml
    torchrun --nproc-per-node 8 -m megatron_bluelm.stages.rl --config my_rl.yaml --checkpoint.load ckpt/sft

Each step: sample ``rl.prompts_per_step`` prompts (split over data-parallel ranks), generate
``rl.group_size`` responses each, score them (rl/rewards.py), group-normalize advantages, recompute
old (and reference) log-probs, then ``rl.updates_per_step`` optimizer steps. See docs/RL.md.
"""
from __future__ import annotations

import argparse
import random
import time
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.loader import load_config
from megatron_bluelm.config.schema import RunConfig


def check_rl_config(cfg: RunConfig, dp: int) -> None:
    rl, t, p = cfg.rl, cfg.training, cfg.parallel
    if rl.prompts_per_step % dp:
        raise ConfigError(f"rl.prompts_per_step ({rl.prompts_per_step}) must be divisible by the data-parallel "
                          f"size ({dp})")
    local = rl.prompts_per_step // dp * rl.group_size
    if local % (rl.updates_per_step * t.micro_batch_size):
        raise ConfigError(f"samples per data-parallel rank ({local} = prompts_per_step / dp x group_size) must be "
                          f"divisible by rl.updates_per_step x training.micro_batch_size "
                          f"({rl.updates_per_step} x {t.micro_batch_size})")
    if rl.group_size < 2:
        raise ConfigError("rl.group_size: GRPO needs at least 2 samples per prompt")
    if p.vpp is not None or p.overlap_param_gather:
        raise ConfigError("parallel.vpp / parallel.overlap_param_gather: not supported by RL rollouts")
    if rl.max_new_tokens >= cfg.data.seq_length:
        raise ConfigError(f"rl.max_new_tokens ({rl.max_new_tokens}) must be < data.seq_length ({cfg.data.seq_length})")


def _dp() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def _dp_mean(values: list[float], device) -> float:
    from megatron.core import parallel_state as ps

    t = torch.tensor([sum(values), float(len(values))], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return (t[0] / t[1].clamp(min=1)).item()


def _dp_sum(value: float, device) -> float:
    from megatron.core import parallel_state as ps

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.item()


def warmup_sft(run, tok, task, steps: int) -> None:
    """Supervised steps on the task's warm-up pairs (a cold start for toy tasks, see rl/tasks.py)."""
    from megatron_bluelm.rl.rollout import training_rows
    from megatron_bluelm.rl.trainer import micro_batches
    from megatron_bluelm.training.step import train_step

    cfg = run.cfg
    rank, dp = _dp()
    n_local = cfg.rl.prompts_per_step * cfg.rl.group_size // dp
    for step in range(steps):
        recs = task.records(n_local * dp, seed=cfg.rl.seed + 10_000_000 + step)[rank * n_local:(rank + 1) * n_local]
        rng = random.Random(cfg.rl.seed * 7919 + step * 104_729 + rank)
        pairs = [task.warmup_pair(r, rng) for r in recs]
        rows = training_rows([tok.encode(p) for p, _ in pairs], [tok.encode(c) + [tok.eod] for _, c in pairs],
                             cfg.data.seq_length, tok.pad)
        batches = micro_batches(rows, {}, cfg.training.micro_batch_size)
        res = train_step(run.model, run.optimizer, run.scheduler, [iter(batches)], num_microbatches=len(batches),
                         seq_length=cfg.data.seq_length, micro_batch_size=cfg.training.micro_batch_size,
                         device=run.info.device)
        if (step + 1) % cfg.logging.log_interval == 0 and res.loss is not None:
            run.logger.print(f"warm-up sft {step + 1:>4}/{steps} | loss {res.loss:.4f}")


def build_reference(run, build_chunk: Callable):
    """A frozen copy of the current policy (for the KL term): same layout, the policy's weights."""
    from megatron_bluelm.training.model_setup import build_model_chunks

    ref = build_model_chunks(run.cfg, build_chunk, run.info.device)
    for module, chunk in zip(ref, run.model):
        module.load_state_dict(chunk.module.state_dict())
        module.requires_grad_(False)
    return ref


def rl_step(run, tok, task, rewards, ref_model) -> dict:
    from megatron_bluelm.inference.runner import ModelRunner
    from megatron_bluelm.rl.advantages import group_advantages
    from megatron_bluelm.rl.loss import GRPOSettings
    from megatron_bluelm.rl.rollout import generate_rollouts, training_rows
    from megatron_bluelm.rl.trainer import micro_batches, policy_update, sequence_logprobs

    cfg, rl, device = run.cfg, run.cfg.rl, run.info.device
    rank, dp = _dp()
    k = rl.prompts_per_step // dp
    records = task.records(rl.prompts_per_step, seed=rl.seed + run.step)[rank * k:(rank + 1) * k]

    t0 = time.perf_counter()
    runner = ModelRunner(run.model[0].module, device)
    max_context = cfg.data.seq_length
    seed = rl.seed * 1_000_003 + run.step * 1009 + rank  # same on the TP/PP ranks of one replica
    roll = generate_rollouts(runner, tok, records, group_size=rl.group_size, rl=rl, seed=seed,
                             vocab_size=tok.vocab_size, max_context=max_context)  # sample decodable ids only
    for chunk in run.model:
        chunk.train()
    t_roll = time.perf_counter() - t0

    samples = [dict(r, thinking_tokens=n, thinking_budget=r.get("thinking_budget", rl.thinking_budget))
               for r, n in zip(roll.records, roll.thinking_tokens)]
    scored = rewards(roll.texts, samples)
    reward = torch.tensor([s["reward"] for s in scored])
    adv, keep = group_advantages(reward, rl.group_size, rl.normalize_std)
    filtered = 1.0 - keep.float()
    if not rl.filter_zero_variance:  # equal-reward groups stay in the loss (A = 0: only the KL term acts)
        keep = torch.ones_like(keep)
    rows = training_rows(roll.prompts, roll.responses, cfg.data.seq_length, tok.pad)
    mbs = cfg.training.micro_batch_size
    batches = micro_batches(rows, {"advantages": adv, "keep": keep.float()}, mbs)

    stats = {"reward": _dp_mean(reward.tolist(), device),
             "response_len": _dp_mean([float(len(r)) for r in roll.responses], device),
             "thinking_len": _dp_mean([float(n) for n in roll.thinking_tokens], device),
             "zero_variance_frac": _dp_mean(filtered.tolist(), device),
             "filtered_frac": 1.0 - _dp_mean(keep.float().tolist(), device),
             "rollout_tokens_per_s": _dp_sum(float(sum(len(r) for r in roll.responses)), device) / max(t_roll, 1e-9)}
    for name in next(iter(scored)).keys() - {"reward"}:
        stats[f"reward/{name}"] = _dp_mean([s[name] for s in scored], device)

    t1 = time.perf_counter()
    if _dp_sum(float(keep.sum()), device) == 0:  # every group had equal rewards: nothing to learn
        stats.update(skipped_update=True, update_s=0.0)
        return stats
    old = sequence_logprobs(run.model, batches, cfg.data.seq_length, mbs, device)
    ref = sequence_logprobs(ref_model, batches, cfg.data.seq_length, mbs, device) if ref_model else None
    for i, mb in enumerate(batches):
        mb["old_logp"] = old[i] if old is not None else None
        mb["ref_logp"] = ref[i] if ref is not None else None
    settings = GRPOSettings(rl.clip_low, rl.clip_high, rl.kl_coef)
    per_update = len(batches) // rl.updates_per_step
    upd = None
    for u in range(rl.updates_per_step):
        part = batches[u * per_update:(u + 1) * per_update]
        kept = sum(float((mb["keep"][:, None] * mb["loss_mask"]).sum()) for mb in part)
        if _dp_sum(kept, device) == 0:  # every group of this mini-batch was filtered: no tokens to learn
            continue
        upd = policy_update(run.model, run.optimizer, run.scheduler, part, settings,
                            seq_length=cfg.data.seq_length, mbs=mbs, device=device)
        if "first_ratio_mean" not in stats and "ratio_mean" in upd:  # the batch's first update
            stats.update(first_ratio_mean=upd["ratio_mean"], first_kl=upd["kl"])
    if upd is None:
        stats.update(skipped_update=True, update_s=0.0)
        return stats
    stats.update(upd, update_s=time.perf_counter() - t1)
    return stats


def run_rl(cfg: RunConfig, collect: Optional[Callable] = None) -> dict:
    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.models.counting import DecoderShape, train_flops_per_token
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.rl.rewards import HybridReward
    from megatron_bluelm.rl.tasks import load_task
    from megatron_bluelm.training.loop import prepare_config, run_stage, setup_run

    dp = prepare_config(cfg)
    check_rl_config(cfg, dp)
    tok = load_tokenizer(cfg.data.tokenizer_model)
    vocab = cfg.model.vocab_size or tok.vocab_size
    rewards = HybridReward(weights={k: v for k, v in cfg.rl.rewards.items() if k != "default"},
                           default=cfg.rl.rewards.get("default", {"exact_match": 1.0}))
    task = load_task(cfg.rl.task)
    build_chunk = partial(build_decoder, cfg, vocab)
    flops = train_flops_per_token(DecoderShape.from_model_config(cfg.model, vocab), cfg.data.seq_length)
    run = setup_run(cfg, build_chunk, flops)

    def body(run, checkpointer):
        if cfg.rl.warmup_sft_steps and run.step == 0:
            warmup_sft(run, tok, task, cfg.rl.warmup_sft_steps)
        ref_model = build_reference(run, build_chunk) if cfg.rl.kl_coef > 0 else None
        while run.step < cfg.training.train_steps:
            stats = rl_step(run, tok, task, rewards, ref_model)
            run.step += 1
            run.history.append(stats)
            run.logger.log(run.step, stats, prefix="rl")
            if run.step % cfg.logging.log_interval == 0 or run.step == cfg.training.train_steps:
                run.logger.print(_format(run.step, cfg.training.train_steps, stats))
            checkpointer.on_step_end(run)

    result = run_stage(run, body, collect)
    result["rl"] = run.history
    return result


def _format(step: int, total: int, s: dict) -> str:
    parts = [f"rl step {step:>5}/{total}", f"reward {s['reward']:.3f}", f"resp len {s['response_len']:.1f}",
             f"think len {s['thinking_len']:.1f}", f"filtered {s['filtered_frac']:.0%}",
             f"rollout tok/s {s['rollout_tokens_per_s']:,.0f}"]
    if not s.get("skipped_update"):
        parts += [f"loss {s.get('loss', float('nan')):.4f}", f"kl {s.get('kl', 0.0):.4f}",
                  f"clip {s.get('clip_frac', 0.0):.2%}", f"update {s['update_s']:.2f}s"]
    else:
        parts.append("update skipped (no reward variance)")
    return " | ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from megatron_bluelm.training.loop import cli

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    args, overrides = ap.parse_known_args(argv)
    cli(lambda: run_rl(load_config(args.config, overrides)))


if __name__ == "__main__":
    main()
