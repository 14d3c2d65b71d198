"""One GRPO step on the megatron model: log-probs (old and reference), then the policy updates, all
through megatron-core's pipeline schedules, so every TP x PP x DP layout trains the same way.

Log-probs are those of the distribution the rollout sampled from: the model's logits (with the
engine's bans: embedding padding rows, ``banned_ids`` such as ``<image>``, a second ``<think>`` once
thinking and ``</think>`` after the close, per position from the row's ``think_state``) divided by
the rollout temperature, restricted to the
top-k / top-p nucleus when those are on (renormalized over it; the nucleus is computed from the
current logits and always holds the label, so the value stays finite). Old log-probs are recomputed
with the policy right before the first update of a batch (same code path), so the first update's
ratio is exactly 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_bluelm.rl.loss import GRPOSettings, aggregate, grpo_token_loss
from megatron_bluelm.training.step import batch_to_device

# Summed per micro-batch, over all mini-batches of a step, then over data parallel (order fixed).
STATS = ("loss_sum", "count", "tokens", "ratio", "kl", "clipped", "dual_clipped", "entropy", "nll",
         "is_weight", "is_masked", "mismatch", "mismatch_tokens")


@dataclass(frozen=True)
class LogProbSpec:
    """How the rollout sampled: the training log-probs use the same distribution."""

    vocab_size: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    banned_ids: tuple = ()  # never sampled (the engine's banned_ids)
    think_ids: Optional[tuple] = None  # (<think>, </think>): banned by thinking state (rows' think_state)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("RL samples: temperature must be > 0 (greedy rollouts have no log-probs to train)")


def micro_batches(rows: dict, extra: dict, mbs: int) -> list[dict]:
    """Split rows (and per-sample extras) into micro-batches; per-row image tiles
    (``rows['pixel_rows']``: one tensor or None per row) become each micro-batch's ``pixel_values``."""
    n = rows["tokens"].shape[0]
    pixel_rows = rows.get("pixel_rows")
    out = []
    for i in range(0, n, mbs):
        mb = {k: (v[i:i + mbs] if v is not None else None) for k, v in rows.items() if k != "pixel_rows"}
        mb.update({k: (v[i:i + mbs] if v is not None else None) for k, v in extra.items()})
        if pixel_rows is not None:
            tiles = [t for t in pixel_rows[i:i + mbs] if t is not None]
            if tiles:
                mb["pixel_values"] = torch.cat(tiles)
        out.append(mb)
    return out


def _model_forward(device, data_iterator: Iterator, model):
    mb = next(data_iterator)
    b = batch_to_device(mb, device)
    extra = {}
    if b.get("pixel_values") is not None:
        extra["pixel_values"] = b["pixel_values"]
        if mb["tokens"].device.type == "cpu":  # the splice's <image> slots from the host tokens: no device sync
            extra["host_input_ids"] = mb["tokens"]
    logits = model(b["tokens"], b["position_ids"], None, **extra)  # [b, s, vocab / tp] on the last stage
    return logits, mb


def _mask_banned(logits: torch.Tensor, labels: torch.Tensor, spec: LogProbSpec, think_state, gathered: bool
                 ) -> torch.Tensor:
    """-inf where the engine's sampler puts it: the embedding's padding rows (>= vocab_size), the
    banned ids, and ``<think>`` / ``</think>`` by thinking state (decode_state.advance). A position's
    own label is never masked (prompt and forced tokens may be banned ones; their log-probs stay
    finite and are out of the loss), which changes nothing where the policy sampled the label."""
    width = logits.shape[-1]
    start = 0 if gathered else parallel_state.get_tensor_model_parallel_rank() * width
    if start + width > spec.vocab_size:
        ids = torch.arange(start, start + width, device=logits.device)
        logits = logits.masked_fill(ids >= spec.vocab_size, float("-inf"))
    bans = [(t, None) for t in spec.banned_ids]
    if spec.think_ids is not None and think_state is not None:
        state = think_state.to(logits.device)
        bans += [(spec.think_ids[0], state >= 1), (spec.think_ids[1], state == 2)]
    local = [(t - start, when) for t, when in bans if start <= t < start + width]
    if not local:
        return logits
    logits = logits.clone()
    for col, when in local:
        ban = labels != col + start
        if when is not None:
            ban = ban & when
        logits[..., col] = logits[..., col].masked_fill(ban, float("-inf"))
    return logits


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, spec: LogProbSpec, think_state=None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) [b, s] under the sampling distribution, its entropy [b, s] (no gradient)).
    ``think_state`` [b, s]: the rows' thinking state (rl/rollout.think_states) for the think-tag bans."""
    logits = logits.float() / spec.temperature
    nucleus = spec.top_k > 0 or spec.top_p < 1.0
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if nucleus and tp > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    gathered = nucleus or tp == 1
    logits = _mask_banned(logits, labels, spec, think_state, gathered)
    if nucleus:
        from megatron_bluelm.inference.sampling import filter_top_k, filter_top_p

        with torch.no_grad():
            keep = torch.isfinite(filter_top_p(filter_top_k(logits.detach(), spec.top_k), spec.top_p))
            keep.scatter_(-1, labels[..., None], True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if gathered:
        logz = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, labels[..., None]).squeeze(-1) - logz
        with torch.no_grad():
            p = torch.softmax(logits.detach(), -1)
            entropy = logz.detach() - torch.nan_to_num((p * logits.detach()), nan=0.0, neginf=0.0).sum(-1)
        return logp, entropy
    logp = -tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), labels)
    return logp, _vocab_parallel_entropy(logits.detach())


@torch.no_grad()
def _vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    m = logits.max(-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(logits - m[..., None])
    z = e.sum(-1)
    dist.all_reduce(z, group=group)
    pl = torch.nan_to_num(e * logits, nan=0.0, neginf=0.0).sum(-1)
    dist.all_reduce(pl, group=group)
    return torch.log(z) + m - pl / z


@torch.no_grad()
def sequence_logprobs(model: List[torch.nn.Module], batches: list[dict], spec: LogProbSpec, seq_length: int,
                      mbs: int, device) -> Optional[list[torch.Tensor]]:
    """log p(label) [b, s] per micro-batch, on the last pipeline stage (None elsewhere)."""

    def forward_step(it, m):
        logits, mb = _model_forward(device, it, m)
        labels = mb["labels"].to(logits.device)
        state = mb.get("think_state")
        return logits, lambda out, non_loss_data=False: token_logprobs(out, labels, spec, state)[0].cpu()

    # Same mode (train, no dropout in our configs) and path as the update: the first ratio is exactly 1.
    outs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=model,
        num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=mbs,
        forward_only=True, collect_non_loss_data=True)
    return outs if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None


def _grpo_loss(settings: GRPOSettings, spec: LogProbSpec, mb: dict, logits: torch.Tensor):
    dev = logits.device
    logp, entropy = token_logprobs(logits, mb["labels"].to(dev), spec, mb.get("think_state"))
    adv = mb["advantages"].to(dev)[:, None]
    ref = mb["ref_logp"].to(dev) if mb.get("ref_logp") is not None else None
    old = mb["old_logp"].to(dev)
    roll = mb["rollout_logp"].to(dev) if mb.get("rollout_logp") is not None else None
    terms = grpo_token_loss(logp, old, adv, ref, settings, roll)
    mask = mb["loss_mask"].to(dev) * mb["keep"].to(dev)[:, None]
    used = mask * terms["is_keep"]
    loss, count = aggregate(terms["loss"], used, settings)
    d = lambda t: (t.detach() * used).sum()  # noqa: E731
    if roll is not None:
        mismatch, mismatch_tokens = ((old - roll).abs() * mask).sum(), mask.sum()
    else:
        mismatch = mismatch_tokens = torch.zeros((), device=dev)
    report = torch.stack([loss.detach(), count.float(), used.sum(), d(terms["ratio"]), d(terms["kl"]),
                          d(terms["clipped"]), d(terms["dual_clipped"]), d(entropy), d(-logp),
                          d(terms["is_weight"]), (mask * (1 - terms["is_keep"])).sum(), mismatch,
                          mismatch_tokens]).float()
    return loss, count.to(torch.int), {"rl": report}


def policy_update(model, optimizer, scheduler, batches: list[dict], settings: GRPOSettings, spec: LogProbSpec,
                  *, seq_length: int, mbs: int, device) -> tuple[dict, list]:
    """One optimizer step over ``batches`` (this DP rank's micro-batches): (step info, raw reports)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()

    def forward_step(it, m):
        logits, mb = _model_forward(device, it, m)
        return logits, partial(_grpo_loss, settings, spec, mb)

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=model,
        num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=mbs, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return {"grad_norm": None if grad_norm is None else float(grad_norm), "skipped": not ok}, list(reports)


def reduce_stats(reports: list, device) -> dict:
    """Means over every micro-batch of every mini-batch of the step and every DP rank. Computed on the
    last pipeline stage, then sent to every rank of the pipeline so all ranks log the same values."""
    total = torch.zeros(len(STATS), dtype=torch.float64, device=device)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if last:
        for r in reports:
            total += r["rl"].detach().double().to(device)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    t = dict(zip(STATS, total.tolist()))
    n = max(t["tokens"], 1.0)
    out = {"loss": t["loss_sum"] / max(t["count"], 1.0), "update_tokens": int(t["tokens"]),
           "ratio_mean": t["ratio"] / n, "kl": t["kl"] / n, "clip_frac": t["clipped"] / n,
           "dual_clip_frac": t["dual_clipped"] / n, "entropy": t["entropy"] / n, "nll": t["nll"] / n,
           "is_weight_mean": t["is_weight"] / n}
    if t["mismatch_tokens"] > 0:
        out["rollout_mismatch"] = t["mismatch"] / t["mismatch_tokens"]  # mean |log p_train - log p_rollout|
        out["is_masked_frac"] = t["is_masked"] / t["mismatch_tokens"]
    return out
