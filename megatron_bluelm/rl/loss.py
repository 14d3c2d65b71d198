"""The GRPO policy loss per token (PPO-style clipping, dual-clip, KL penalty, rollout correction)
and the loss aggregation modes.

For response token t of sample i (advantage A_i, current log-prob lp, old log-prob lp_old recomputed
by the trainer before the first update, reference lp_ref, rollout log-prob lp_roll from the engine):

    log_ratio = clamp(lp - lp_old, -c, c)                    (c = log_ratio_clamp: no exp overflow)
    ratio     = exp(log_ratio)
    pg        = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    pg        = min(pg, -A * dual_clip)          for A < 0   (dual-clip: bounds the loss of a token whose
                                                              ratio ran far above 1 with negative advantage)
    kl        = min(exp(d) - d - 1, kl_clamp),   d = clamp(lp_ref - lp, -c, c)   (k3 estimator, >= 0)
    w         = rollout importance weight (below), no gradient
    loss_t    = w * pg + beta * kl

Rollout correction (the train-inference mismatch: the engine's sampling distribution differs from the
trainer's numerically, in kernels and precision): with rho = exp(lp_old - lp_roll),
``tis`` (truncated IS) w = min(rho, cap); ``mis`` (masked IS) w = 1 where rho <= cap, else the token
leaves the loss (w = 0); ``none`` w = 1.

Aggregation (names as in verl), what the per-token losses are summed into before megatron-core divides
by the global count the loss function reports:
``token-mean``              sum over all response tokens / number of tokens (DAPO)
``seq-mean-token-sum``      per sequence: sum over its tokens; mean over sequences
``seq-mean-token-mean``     per sequence: mean over its tokens; mean over sequences (original GRPO)
``seq-mean-token-sum-norm`` per sequence: sum / a constant (max response length); mean over sequences
                            (Dr. GRPO: no length bias from the normalizer)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ROLLOUT_IS_MODES = ("tis", "mis", "none")


@dataclass(frozen=True)
class GRPOSettings:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    dual_clip: Optional[float] = None  # > 1, e.g. 3.0 (verl's clip_ratio_c); None: off
    log_ratio_clamp: float = 20.0
    kl_clamp: float = 10.0
    loss_agg: str = "token-mean"
    norm_length: int = 1  # the constant of seq-mean-token-sum-norm (rl.max_new_tokens)
    rollout_is: str = "none"
    rollout_is_cap: float = 2.0

    def __post_init__(self):
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg: {self.loss_agg!r} is not one of {LOSS_AGG_MODES}")
        if self.rollout_is not in ROLLOUT_IS_MODES:
            raise ValueError(f"rollout_is: {self.rollout_is!r} is not one of {ROLLOUT_IS_MODES}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip: must be > 1 (or None), got {self.dual_clip}")


def rollout_weights(old_logp: torch.Tensor, rollout_logp: Optional[torch.Tensor], s: GRPOSettings
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token weight, per-token keep mask) correcting for the rollout's sampling distribution."""
    ones = torch.ones_like(old_logp)
    if s.rollout_is == "none" or rollout_logp is None:
        return ones, ones
    rho = torch.exp(torch.clamp(old_logp - rollout_logp, -s.log_ratio_clamp, s.log_ratio_clamp))
    if s.rollout_is == "tis":
        return torch.clamp(rho, max=s.rollout_is_cap), ones
    keep = (rho <= s.rollout_is_cap).to(old_logp.dtype)
    return ones, keep


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    ref_logp: Optional[torch.Tensor], s: GRPOSettings,
                    rollout_logp: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """All tensors [b, s] (advantages broadcast per sample); returns per-token terms."""
    log_ratio = torch.clamp(logp - old_logp, -s.log_ratio_clamp, s.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1.0 - s.clip_low, 1.0 + s.clip_high) * advantages
    pg = torch.maximum(unclipped, clipped)
    out = {"ratio": ratio, "clipped": (clipped > unclipped).float()}
    if s.dual_clip is not None:
        bound = -advantages * s.dual_clip
        dual = (advantages < 0) & (pg > bound)
        pg = torch.where(dual, bound.expand_as(pg), pg)
        out["dual_clipped"] = dual.float()
    else:
        out["dual_clipped"] = torch.zeros_like(pg)
    weight, keep = rollout_weights(old_logp.detach(), rollout_logp, s)
    out["is_weight"], out["is_keep"] = weight, keep
    out["pg"] = pg
    if ref_logp is not None:
        delta = torch.clamp(ref_logp - logp, -s.log_ratio_clamp, s.log_ratio_clamp)
        out["kl"] = torch.clamp(torch.exp(delta) - delta - 1.0, max=s.kl_clamp)
        out["loss"] = weight * pg + s.kl_coef * out["kl"]
    else:
        out["kl"] = torch.zeros_like(pg)
        out["loss"] = weight * pg
    return out


def aggregate(loss: torch.Tensor, mask: torch.Tensor, s: GRPOSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, count) for megatron-core's per-token-loss reduction: the step's gradient is the sum
    of every micro-batch's loss sum divided by the global sum of counts (all-reduced over DP)."""
    if s.loss_agg == "token-mean":
        return (loss * mask).sum(), mask.sum()
    per_seq_tokens = mask.sum(-1)
    seqs = (per_seq_tokens > 0).to(loss.dtype)
    seq_sum = (loss * mask).sum(-1)
    if s.loss_agg == "seq-mean-token-mean":
        seq_sum = seq_sum / per_seq_tokens.clamp(min=1)
    elif s.loss_agg == "seq-mean-token-sum-norm":
        seq_sum = seq_sum / float(s.norm_length)
    return (seq_sum * seqs).sum(), seqs.sum()
