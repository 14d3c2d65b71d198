"""RL stage: GRPO-family policy optimization on the megatron model (TP / PP / DP), text or image
prompts, rollouts through the generation engine. See docs/RL.md.

    python -m megatron_bluelm.stages.rl --config examples/rl_toy.yaml
    torchrun --nproc-per-node 8 -m megatron_bluelm.stages.rl --config examples/rl_math.yaml \\
        --pretrained outputs/sft/ckpt --checkpoint.save outputs/rl/ckpt

``--pretrained CKPT`` starts RL from the weights of an SFT / pretrain (or multimodal) checkpoint;
optimizer, schedule and step start fresh. The KL reference is the policy at the start of RL and is
saved with every RL checkpoint, so ``--checkpoint.load`` of an RL checkpoint resumes the run exactly
(same anchor, optimizer, schedule, step). ``checkpoint.load`` of a non-RL checkpoint is an error
naming ``--pretrained``.

Each step: ``rl.prompts_per_step`` prompts (split over data-parallel ranks), ``rl.group_size``
samples each, rewards per data source (rl/rewards.py; a reward model for the ``model`` reward),
group advantages (zero-variance groups refilled by DAPO dynamic sampling up to
``rl.dynamic_sampling_rounds`` extra rounds), old / reference log-probs, then ``rl.updates_per_step``
optimizer steps (the LR schedule counts those updates).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import time
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.loader import load_config
from megatron_bluelm.config.schema import RunConfig

CORRECTNESS = ("math_boxed", "exact_match", "multiple_choice")  # what held-out accuracy counts


def check_rl_config(cfg: RunConfig, dp: int) -> None:
    from megatron_bluelm.rl.loss import LOSS_AGG_MODES, ROLLOUT_IS_MODES

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
    if rl.temperature <= 0:
        raise ConfigError(f"rl.temperature: must be > 0 for sampled rollouts, got {rl.temperature}")
    if not 0 < rl.top_p <= 1 or rl.top_k < 0:
        raise ConfigError(f"rl.top_p must be in (0, 1] and rl.top_k >= 0, got {rl.top_p} / {rl.top_k}")
    choices = {"loss_agg": LOSS_AGG_MODES, "rollout_is": ROLLOUT_IS_MODES, "advantage_std": ("group", "source")}
    for name, allowed in choices.items():
        if getattr(rl, name) not in allowed:
            raise ConfigError(f"rl.{name}: {getattr(rl, name)!r} is not one of {list(allowed)}")
    if rl.dual_clip is not None and rl.dual_clip <= 1:
        raise ConfigError(f"rl.dual_clip: must be > 1 (or null: off), got {rl.dual_clip}")
    if rl.rollout_is_cap <= 0 or rl.log_ratio_clamp <= 0 or rl.kl_clamp <= 0 or rl.kl_coef < 0:
        raise ConfigError("rl.rollout_is_cap, rl.log_ratio_clamp, rl.kl_clamp must be > 0 and rl.kl_coef >= 0")
    if rl.dynamic_sampling_rounds < 0:
        raise ConfigError(f"rl.dynamic_sampling_rounds: must be >= 0, got {rl.dynamic_sampling_rounds}")
    if not 0 <= rl.overlong_buffer < rl.max_new_tokens or rl.budget_buffer < 0:
        raise ConfigError(f"rl.overlong_buffer must be in [0, rl.max_new_tokens) and rl.budget_buffer >= 0, got "
                          f"{rl.overlong_buffer} / {rl.budget_buffer}")
    uses_model = any("model" in (ws or {}) for ws in rl.rewards.values())
    if uses_model and not rl.reward_model:
        raise ConfigError("rl.rewards: a 'model' reward needs rl.reward_model (a checkpoint of the reward-model "
                          "stage, python -m megatron_bluelm.stages.reward_model)")


def optimizer_steps(cfg: RunConfig) -> int:
    """Optimizer updates the RL stage makes: what the LR schedule counts."""
    return cfg.rl.warmup_sft_steps + cfg.training.train_steps * cfg.rl.updates_per_step


def _dp() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def _dp_sums(values: Sequence[float], device) -> list[float]:
    """Element-wise sums over data-parallel ranks (one all-reduce; every rank passes the same length)."""
    from megatron.core import parallel_state as ps

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.tolist()


def _mean_pairs(pairs: dict, device) -> dict:
    """{name: (sum, count)} -> {name: global mean} with one all-reduce, in the dict's (fixed) order."""
    flat = [x for s, c in pairs.values() for x in (s, c)]
    tot = _dp_sums(flat, device)
    return {k: (tot[2 * i] / tot[2 * i + 1] if tot[2 * i + 1] else float("nan")) for i, k in enumerate(pairs)}


# ----------------------------------------------------------------------------- start

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


def build_reference(run, build_chunk: Callable) -> list:
    """Frozen chunks of the policy's layout (the KL anchor); weights set by ``copy_policy``."""
    from megatron_bluelm.training.model_setup import build_model_chunks

    ref = build_model_chunks(run.cfg, build_chunk, run.info.device)
    for module in ref:
        module.requires_grad_(False)
    return ref


@torch.no_grad()
def copy_policy(model, ref) -> None:
    for module, chunk in zip(ref, model):
        module.load_state_dict(chunk.module.state_dict())


def check_resume_source(cfg: RunConfig) -> None:
    """``checkpoint.load`` resumes RL runs only: an SFT / pretrain checkpoint would resume *its* step
    and optimizer (and RL would start at, say, step 200 of 3). Point at ``--pretrained`` instead."""
    from megatron_bluelm.training.checkpointing import read_meta, resolve_checkpoint

    load = cfg.checkpoint.load
    if not load or (cfg.checkpoint.save and os.path.abspath(load) == os.path.abspath(cfg.checkpoint.save)
                    and not os.path.isdir(load)):
        return
    path, _ = resolve_checkpoint(load)
    if path is None:
        return
    meta = read_meta(path)
    if meta.get("stage") != "rl":
        raise ConfigError(f"checkpoint.load: '{load}' is a {meta.get('stage') or 'non-RL'} checkpoint; "
                          f"checkpoint.load resumes RL runs only. Start RL from its weights with "
                          f"--pretrained {load}")
    if cfg.rl.kl_coef > 0 and "reference" not in meta.get("frozen", []):
        raise ConfigError(f"checkpoint.load: '{load}' was saved without a KL reference (rl.kl_coef was 0); "
                          "resume it with rl.kl_coef: 0, or start a new run from it with --pretrained")


def load_pretrained(run, root: str) -> str:
    """Weights only (any layout): a text checkpoint into the decoder (of the multimodal model too),
    a multimodal one into the multimodal model."""
    if run.cfg.vision.enabled:
        from megatron_bluelm.stages.multimodal import load_pretrained as load_mm

        return load_mm(run, root)
    from megatron_bluelm.inference.loading import load_weights

    path = load_weights(run.model, root)
    run.optimizer.reload_model_params()  # the optimizer's main copies follow the loaded weights
    run.logger.print(f"loaded pretrained weights from '{path}'")
    return path


def build_reward_scorer(cfg: RunConfig, tok, device) -> Callable:
    """The reward-model checkpoint ``rl.reward_model`` in this run's TP x PP layout, as a scorer."""
    from megatron_bluelm.inference.loading import checkpoint_dir, checkpoint_run_config, load_weights
    from megatron_bluelm.rl.reward_model import build_reward_model, model_reward
    from megatron_bluelm.training.checkpointing import read_meta
    from megatron_bluelm.training.model_setup import build_model_chunks

    root = cfg.rl.reward_model
    if read_meta(checkpoint_dir(root)).get("stage") != "reward_model":
        raise ConfigError(f"rl.reward_model: '{root}' is not a checkpoint of the reward-model stage")
    rm_cfg = checkpoint_run_config(root)
    rm_cfg.parallel = dataclasses.replace(cfg.parallel, first_stage_layers=None, last_stage_layers=None)
    rm_cfg.training.precision, rm_cfg.model.backend = cfg.training.precision, cfg.model.backend
    vocab = rm_cfg.model.vocab_size or tok.vocab_size
    chunks = build_model_chunks(rm_cfg, partial(build_reward_model, rm_cfg, vocab), device)
    load_weights(chunks, root)
    for c in chunks:
        c.requires_grad_(False)
    return model_reward(chunks, tok, seq_length=rm_cfg.data.seq_length, mbs=cfg.training.micro_batch_size,
                        device=device)


# ----------------------------------------------------------------------------- rollouts

class Sampler:
    """Rollouts and rewards for one step on this data-parallel rank, with DAPO dynamic sampling."""

    def __init__(self, run, tok, task, rewards, images):
        self.run, self.tok, self.task, self.rewards, self.images = run, tok, task, rewards, images

    def _round(self, records, seed: int, rl):
        from megatron_bluelm.rl.rollout import generate_rollouts

        run = self.run
        roll = generate_rollouts(self.engine(), self.tok, records, group_size=rl.group_size, rl=rl, seed=seed,
                                 vocab_size=self.tok.vocab_size, max_context=run.cfg.data.seq_length,
                                 images=self.images, need_logprobs=rl.rollout_is != "none", tables=self.tables)
        for chunk in run.model:
            chunk.train()
        samples = [dict(r, thinking_tokens=n, thinking_budget=r.get("thinking_budget", rl.thinking_budget),
                        forced_close=fc, finish_reason=fr, response_tokens=len(resp),
                        max_new_tokens=rl.max_new_tokens, budget_buffer=rl.budget_buffer,
                        overlong_buffer=rl.overlong_buffer)
                   for r, n, fc, fr, resp in zip(roll.records, roll.thinking_tokens, roll.forced_close,
                                                 roll.finish_reasons, roll.responses)]
        for s in samples:
            s["thinking"] = s["thinking_budget"] != 0
        return roll, samples, self.rewards(roll.texts, samples)

    def engine(self):
        """The generation engine over the policy's own parameters (built once: no weight copy or sync).
        With ``overlap_param_gather`` the other DP ranks' shards of the last update are still being
        gathered; the engine reads the parameters directly (no forward hook), so finish that first."""
        from megatron_bluelm.training.checkpointing import finish_param_gather

        finish_param_gather(self.run.model)
        if getattr(self, "_engine", None) is None:
            from megatron_bluelm.inference.decode_state import TokenTables
            from megatron_bluelm.inference.generate import make_engine

            self._engine = make_engine(self.run.model[0].module, self.run.info.device)
            self.tables = TokenTables.from_tokenizer(self.tok, self.tok.vocab_size)
        return self._engine

    def collect(self, step: int) -> dict:
        """Per sample, group-major: the rollout fields, the scored samples, and which groups had reward
        variance. Zero-variance groups are replaced by groups of new prompts for up to
        ``rl.dynamic_sampling_rounds`` extra rounds; what is still missing then stays zero-variance
        (filtered from the loss)."""
        rl = self.run.cfg.rl
        rank, dp = _dp()
        k, g = rl.prompts_per_step // dp, rl.group_size
        records = self.task.records(rl.prompts_per_step, seed=rl.seed + step)[rank * k:(rank + 1) * k]
        seed = rl.seed * 1_000_003 + step * 1009 + rank  # same on the TP/PP ranks of one replica
        parts = [self._round(records, seed, rl)]
        rounds = 0
        while rl.dynamic_sampling_rounds and rounds < rl.dynamic_sampling_rounds:
            if sum(_varied(p[2], g).count(True) for p in parts) >= k:
                break
            rounds += 1
            more = self.task.records(k, seed=(rl.seed + 1) * 100_003 + step * 7919 + rounds * 104_729 + rank * 13)
            parts.append(self._round(more, seed + rounds * 15_485_863, rl))
        return _select_groups(parts, k, g) | {"refill_rounds": rounds}


def _varied(scored: list, g: int) -> list[bool]:
    r = [s["reward"] for s in scored]
    return [len(set(r[i:i + g])) > 1 for i in range(0, len(r), g)]


def _select_groups(parts: list, k: int, g: int) -> dict:
    """The first ``k`` groups with reward variance over all rounds, then zero-variance ones of the
    first round to fill up (they carry no signal and are filtered)."""
    varied, flat = [], []
    for pi, (_, _, scored) in enumerate(parts):
        for gi, v in enumerate(_varied(scored, g)):
            (varied if v else flat).append((pi, gi))
    if len(parts) == 1:
        chosen = [(0, gi) for gi in range(len(parts[0][0]) // g)]
    else:
        chosen = (varied + [x for x in flat if x[0] == 0] + [x for x in flat if x[0] != 0])[:k]
    out = {key: [] for key in ("prompts", "responses", "texts", "forced", "logprobs", "pixel_rows",
                               "samples", "scored", "thinking_tokens")}
    for pi, gi in chosen:
        roll, samples, scored = parts[pi]
        sl = slice(gi * g, (gi + 1) * g)
        out["prompts"] += roll.prompts[sl]
        out["responses"] += roll.responses[sl]
        out["texts"] += roll.texts[sl]
        out["forced"] += roll.forced[sl]
        out["thinking_tokens"] += roll.thinking_tokens[sl]
        out["logprobs"] += roll.logprobs[sl] if roll.logprobs is not None else [None] * g
        out["pixel_rows"] += roll.pixel_rows[sl] if roll.pixel_rows is not None else [None] * g
        out["samples"] += samples[sl]
        out["scored"] += scored[sl]
    if any(lp is None for lp in out["logprobs"]):
        out["logprobs"] = None
    if all(t is None for t in out["pixel_rows"]):
        out["pixel_rows"] = None
    out["generated_groups"] = sum(len(p[0]) for p in parts) // g
    return out


# ----------------------------------------------------------------------------- one step

def _advantages(run, rewards_t: torch.Tensor, samples: list, sources: list[str]):
    from megatron_bluelm.rl.advantages import group_advantages, source_std_advantages

    rl, device = run.cfg.rl, run.info.device
    if rl.advantage_std != "source" or not rl.normalize_std:
        return group_advantages(rewards_t, rl.group_size, rl.normalize_std)
    index = {s: i for i, s in enumerate(sources)}
    ids = torch.tensor([index[s.get("source", "")] for s in samples])
    flat = []
    for i in range(len(sources)):
        r = rewards_t[ids == i].double()
        flat += [r.sum().item(), (r * r).sum().item(), float(r.numel())]
    tot = _dp_sums(flat, device)
    std = []
    for i in range(len(sources)):
        s, s2, n = tot[3 * i:3 * i + 3]
        std.append(math.sqrt(max(s2 / n - (s / n) ** 2, 0.0)) if n else 1.0)
    return source_std_advantages(rewards_t, rl.group_size, ids, torch.tensor(std))


def rl_step(run, sampler: Sampler, ref_model, sources: list[str]) -> dict:
    from megatron_bluelm.rl.loss import GRPOSettings
    from megatron_bluelm.rl.rollout import banned_ids, training_rows
    from megatron_bluelm.rl.trainer import LogProbSpec, micro_batches, policy_update, reduce_stats, sequence_logprobs

    cfg, rl, device = run.cfg, run.cfg.rl, run.info.device
    t0 = time.perf_counter()
    got = sampler.collect(run.step)
    t_roll = time.perf_counter() - t0

    scored, samples = got["scored"], got["samples"]
    reward = torch.tensor([s["reward"] for s in scored])
    adv, keep = _advantages(run, reward, samples, sources)
    filtered = 1.0 - keep.float()
    if not rl.filter_zero_variance:  # equal-reward groups stay in the loss (A = 0: only the KL term acts)
        keep = torch.ones_like(keep)
    think_ids = (sampler.tok.special_ids["<think>"], sampler.tok.special_ids["</think>"])
    rows = training_rows(got["prompts"], got["responses"], cfg.data.seq_length, sampler.tok.pad,
                         forced=got["forced"], logprobs=got["logprobs"], think_ids=think_ids)
    if got["pixel_rows"] is not None:
        rows["pixel_rows"] = got["pixel_rows"]
    mbs = cfg.training.micro_batch_size
    batches = micro_batches(rows, {"advantages": adv, "keep": keep.float()}, mbs)

    n = float(len(reward))
    pairs = {"reward": (reward.sum().item(), n),
             "response_len": (float(sum(len(r) for r in got["responses"])), n),
             "thinking_len": (float(sum(got["thinking_tokens"])), n),
             "forced_close_frac": (float(sum(s["forced_close"] for s in samples)), n),
             "forced_tokens": (float(sum(sum(f) for f in got["forced"])), n),  # per sample, out of the loss
             "zero_variance_frac": (filtered.sum().item(), n),
             "filtered_frac": ((1 - keep.float()).sum().item(), n),
             "generated_groups": (float(got["generated_groups"]), 1.0),
             "refill_rounds": (float(got["refill_rounds"]), 1.0)}
    for name in sampler.rewards.components:  # fixed order: the same vector on every rank
        vals = [s[name] for s in scored if not math.isnan(s[name])]
        pairs[f"reward/{name}"] = (float(sum(vals)), float(len(vals)))
    stats = _mean_pairs(pairs, device)
    rollout_tokens = _dp_sums([float(sum(len(r) for r in got["responses"]))], device)[0]
    stats.update(rollout_tokens_per_s=rollout_tokens / max(t_roll, 1e-9), rollout_s=t_roll)

    t1 = time.perf_counter()
    if _dp_sums([float(keep.sum())], device)[0] == 0:  # every group had equal rewards: nothing to learn
        stats.update(skipped_update=True, logprob_s=0.0, update_s=0.0)
        return stats
    # The rows the rollout could sample: the tokenizer's ids (generation masks the embedding's other rows).
    spec = LogProbSpec(sampler.tok.vocab_size, rl.temperature, rl.top_k, rl.top_p,
                       banned_ids=tuple(banned_ids(sampler.images)), think_ids=think_ids)
    old = sequence_logprobs(run.model, batches, spec, cfg.data.seq_length, mbs, device)
    ref = sequence_logprobs(ref_model, batches, spec, cfg.data.seq_length, mbs, device) if ref_model else None
    for i, mb in enumerate(batches):
        mb["old_logp"] = old[i] if old is not None else None
        mb["ref_logp"] = ref[i] if ref is not None else None
    t2 = time.perf_counter()
    settings = GRPOSettings(rl.clip_low, rl.clip_high, rl.kl_coef, rl.dual_clip, rl.log_ratio_clamp, rl.kl_clamp,
                            rl.loss_agg, rl.max_new_tokens, rl.rollout_is, rl.rollout_is_cap)
    per_update = len(batches) // rl.updates_per_step
    reports, infos, first = [], [], None
    for u in range(rl.updates_per_step):
        part = batches[u * per_update:(u + 1) * per_update]
        kept = sum(float((mb["keep"][:, None] * mb["loss_mask"]).sum()) for mb in part)
        if _dp_sums([kept], device)[0] == 0:  # every group of this mini-batch was filtered: no tokens to learn
            continue
        info, rep = policy_update(run.model, run.optimizer, run.scheduler, part, settings, spec,
                                  seq_length=cfg.data.seq_length, mbs=mbs, device=device)
        if first is None:
            first = reduce_stats(rep, device)
        reports += rep
        infos.append(info)
    if not infos:
        stats.update(skipped_update=True, logprob_s=t2 - t1, update_s=0.0)
        return stats
    stats.update(reduce_stats(reports, device))  # over every mini-batch of the step
    norms = [i["grad_norm"] for i in infos if i["grad_norm"] is not None]
    stats.update(grad_norm=max(norms) if norms else None, updates=len(infos),
                 skipped_updates=sum(i["skipped"] for i in infos),
                 first_ratio_mean=first["ratio_mean"], first_kl=first["kl"],
                 logprob_s=t2 - t1, update_s=time.perf_counter() - t2)
    return stats


# ----------------------------------------------------------------------------- evaluation

def eval_records(eval_task, n: int, seed: int) -> list[dict]:
    """The held-out prompts, the same every evaluation: a JSONL task's first ``n`` records, each once
    (fewer if it has fewer); the built-in arithmetic task's seeded draw of ``n``."""
    items = getattr(eval_task, "items", None)
    if items is not None:
        return [dict(r) for r in items[:n]]
    return eval_task.records(n, seed=seed)


def evaluate(run, sampler: Sampler, eval_task) -> dict:
    """Greedy answers to the held-out prompts, scored by the rewards and by held-out accuracy: the
    correctness verifier of each sample's source (eval/graders.py). With ``rl.eval_samples`` also
    that many samples per prompt at the rollout temperature / top-k / top-p: ``sampled_accuracy``
    (pass@1 of the sampling policy RL trains, which moves before the greedy answer does)."""
    rl = run.cfg.rl
    rank, dp = _dp()
    records = eval_records(eval_task, rl.eval_prompts, rl.seed + 99_991)
    n = max(len(records) - len(records) % dp, dp)
    k = n // dp
    records = (records * dp)[:n][rank * k:(rank + 1) * k]
    greedy = dataclasses.replace(rl, temperature=0.0, top_k=0, top_p=1.0, group_size=1, rollout_is="none")
    _, samples, scored = sampler._round(records, 0, greedy)
    pairs = {"accuracy": _correct_pair(sampler, samples, scored),
             "reward": (float(sum(s["reward"] for s in scored)), float(len(scored)))}
    if rl.eval_samples:
        sampled = dataclasses.replace(rl, group_size=rl.eval_samples, rollout_is="none")
        _, samples, scored = sampler._round(records, rl.seed * 31 + 7 + rank, sampled)  # same draw each time
        pairs["sampled_accuracy"] = _correct_pair(sampler, samples, scored)
    return _mean_pairs(pairs, run.info.device)


def _correct_pair(sampler: Sampler, samples: list, scored: list) -> tuple[float, float]:
    """(correct, graded) over the samples: the first correctness reward each sample's source uses."""
    correct = []
    for s, sc in zip(samples, scored):
        names = [c for c in CORRECTNESS if c in sampler.rewards.weights_for(s)]
        correct.append(sc[names[0]] if names else float("nan"))
    return float(sum(c for c in correct if not math.isnan(c))), float(sum(not math.isnan(c) for c in correct))


# ----------------------------------------------------------------------------- the stage

def _sources(task) -> list[str]:
    return sorted(getattr(task, "by_source", None) or {task.name: None})


def _step_result(stats: dict):
    """An RL step as the shared loop's ``StepResult``: its NaN/inf policy reads loss and skipped."""
    from megatron_bluelm.training.step import StepResult

    return StepResult(loss=stats.get("loss"), tokens=int(stats.get("update_tokens", 0)),
                      grad_norm=stats.get("grad_norm"), skipped=bool(stats.get("skipped_updates")), metrics=stats)


def rl_config(cfg: RunConfig) -> RunConfig:
    """The shared loop counts samples per step in ``training.global_batch_size``: for RL that is the
    rollout batch, prompts_per_step x group_size (a recipe need not repeat it)."""
    cfg.training.global_batch_size = cfg.rl.prompts_per_step * cfg.rl.group_size
    return cfg


def run_rl(cfg: RunConfig, pretrained: Optional[str] = None, collect: Optional[Callable] = None) -> dict:
    from megatron.core import parallel_state

    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.models.counting import DecoderShape, train_flops_per_token
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.rl.rewards import HybridReward
    from megatron_bluelm.rl.tasks import load_task
    from megatron_bluelm.training.loop import prepare_config, run_stage, setup_run, train
    from megatron_bluelm.training.model_setup import build_scheduler

    cfg = rl_config(cfg)
    if cfg.vision.enabled:
        from megatron_bluelm.stages.multimodal import multimodal_config

        cfg = multimodal_config(cfg)
    dp = prepare_config(cfg)
    check_rl_config(cfg, dp)
    check_resume_source(cfg)
    tok = load_tokenizer(cfg.data.tokenizer_model)
    vocab = cfg.model.vocab_size or tok.vocab_size
    task = load_task(cfg.rl.task, cfg.rl.source_ratios)
    eval_task = load_task(cfg.rl.eval_task) if cfg.rl.eval_task else None
    if cfg.vision.enabled:
        from megatron_bluelm.models.multimodal import build_vlm
        from megatron_bluelm.stages.multimodal import train_flops_per_token as mm_flops

        build_chunk = partial(build_vlm, cfg, vocab, tok.special_ids["<image>"])
        flops = mm_flops(cfg, vocab)
    else:
        build_chunk = partial(build_decoder, cfg, vocab)
        flops = train_flops_per_token(DecoderShape.from_model_config(cfg.model, vocab), cfg.data.seq_length)
    run = setup_run(cfg, build_chunk, flops)
    run.stage = "rl"
    run.scheduler = build_scheduler(cfg, run.optimizer, total_steps=optimizer_steps(cfg))
    ref_model = None
    if cfg.rl.kl_coef > 0:
        ref_model = build_reference(run, build_chunk)
        run.frozen_models["reference"] = ref_model
    scorer = build_reward_scorer(cfg, tok, run.info.device) if cfg.rl.reward_model else None
    weights = {k: v for k, v in cfg.rl.rewards.items() if k != "default"}
    rewards = HybridReward(weights=weights, default=cfg.rl.rewards.get("default", {"exact_match": 1.0}),
                           model_reward=scorer)
    images = None
    if cfg.vision.enabled:
        from megatron_bluelm.inference.images import PromptImages

        images = PromptImages.for_model(cfg.vision, tok, parallel_state.is_pipeline_first_stage(ignore_virtual=True))
    sampler = Sampler(run, tok, task, rewards, images)
    sources = _sources(task)
    evals: list = []

    from megatron_bluelm.eval.periodic import PeriodicEval

    periodic = PeriodicEval.from_config(cfg, tok)  # training.eval_benchmarks: accuracy per budget

    def on_eval(run) -> dict:
        out = {}
        if eval_task is not None:
            scores = evaluate(run, sampler, eval_task)
            evals.append({"step": run.step, **scores})
            out.update({f"heldout/{k}": v for k, v in scores.items()})
        if periodic is not None:
            out.update(periodic(run))
        return out

    def on_step_end(run) -> None:
        t = cfg.training
        if run.step % cfg.logging.log_interval == 0 or run.step == t.train_steps:
            run.logger.print(_format(run.step, t.train_steps, run.history[-1]))
        checkpointer.on_step_end(run)

    def body(run, ckpt):
        nonlocal checkpointer
        checkpointer = ckpt
        if run.step == 0:
            if cfg.rl.warmup_sft_steps:
                warmup_sft(run, tok, task, cfg.rl.warmup_sft_steps)
            if ref_model is not None:
                copy_policy(run.model, ref_model)  # the anchor: the policy as RL starts
            if eval_task is not None:
                scores = on_eval(run)
                run.logger.log(0, scores, prefix="eval")
                run.logger.print(f"rl eval step     0 | accuracy {scores['heldout/accuracy']:.3f}")
        run.logger.print(f"RL: {cfg.training.train_steps - run.step} steps of {cfg.rl.prompts_per_step} prompts x "
                         f"{cfg.rl.group_size} samples, {cfg.rl.updates_per_step} update(s) each "
                         f"(TP{run.info.tp} PP{run.info.pp} DP{run.info.dp})")
        train(run, lambda consumed: [], on_step_end=on_step_end,
              on_eval=on_eval if eval_task is not None or periodic is not None else None,
              step_fn=lambda run, _: _step_result(rl_step(run, sampler, ref_model, sources)))
        if run.info.is_logging_rank and run.history:
            from megatron_bluelm.rl.curves import write_curves

            run.logger.print(f"RL curves: {write_curves(run.history, evals, cfg.logging.output_dir)}")

    checkpointer = None
    initial = (lambda run: load_pretrained(run, pretrained)) if pretrained else None
    result = run_stage(run, body, collect, initial_weights=initial)
    result["rl"] = run.history
    result["eval"] = evals
    return result


def _format(step: int, total: int, s: dict) -> str:
    parts = [f"rl step {step:>5}/{total}", f"reward {s['reward']:.3f}", f"resp len {s['response_len']:.1f}",
             f"think len {s['thinking_len']:.1f}", f"filtered {s['filtered_frac']:.0%}",
             f"rollout tok/s {s['rollout_tokens_per_s']:,.0f}"]
    if not s.get("skipped_update"):
        parts += [f"loss {s.get('loss', float('nan')):.4f}", f"kl {s.get('kl', 0.0):.4f}",
                  f"entropy {s.get('entropy', 0.0):.3f}", f"clip {s.get('clip_frac', 0.0):.2%}"]
        if "rollout_mismatch" in s:
            parts.append(f"|lp train-rollout| {s['rollout_mismatch']:.2e}")
        parts.append(f"rollout/logprob/update {s['rollout_s']:.2f}/{s['logprob_s']:.2f}/{s['update_s']:.2f}s")
    else:
        parts.append("update skipped (no reward variance)")
    return " | ".join(parts)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[RunConfig, Optional[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--pretrained", default=None, help="SFT / pretrain checkpoint whose weights RL starts from")
    args, overrides = ap.parse_known_args(argv)
    return load_config(args.config, overrides), args.pretrained


def main(argv: Optional[Sequence[str]] = None) -> None:
    from megatron_bluelm.config.cli import run_stage_cli

    def add_arguments(ap):
        ap.add_argument("--pretrained", default=None, help="SFT / pretrain checkpoint whose weights RL starts from")

    run_stage_cli(__doc__, lambda cfg, args: run_rl(cfg, args.pretrained), argv, add_arguments=add_arguments)


if __name__ == "__main__":
    main()
