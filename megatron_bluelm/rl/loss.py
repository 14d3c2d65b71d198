"""The GRPO policy loss per token, with PPO-style ratio clipping and an optional KL penalty.

For response token t of sample i (advantage A_i, current log-prob lp, rollout-time lp_old, reference
lp_ref):

    ratio  = exp(lp - lp_old)
    pg     = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)
    kl     = exp(lp_ref - lp) - (lp_ref - lp) - 1          (k3 estimator, >= 0, unbiased)
    loss_t = pg + beta * kl

Aggregation is token-level: the trainer sums loss_t over every response token of the global batch and
divides by their count (megatron-core's per-token loss), so long responses are not down-weighted per
token as with per-sample means (the DAPO argument). ``eps_high > eps_low`` is the clip-higher option.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GRPOSettings:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    ref_logp: torch.Tensor | None, s: GRPOSettings) -> dict[str, torch.Tensor]:
    """All tensors [b, s] (advantages broadcast per sample); returns per-token terms."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - s.clip_low, 1.0 + s.clip_high) * advantages
    pg = -torch.minimum(unclipped, clipped)
    out = {"ratio": ratio, "pg": pg, "clipped": (clipped < unclipped).float()}
    if ref_logp is not None:
        delta = ref_logp - logp
        out["kl"] = torch.exp(delta) - delta - 1.0
        out["loss"] = pg + s.kl_coef * out["kl"]
    else:
        out["kl"] = torch.zeros_like(pg)
        out["loss"] = pg
    return out
