"""Attention for generation: prefill through SDPA; decode through ``bluelm_kernels.decode_attention``.

Prefill: ``scaled_dot_product_attention`` (flash / cuDNN on GPU), causal within the chunk, or with an
explicit mask when the chunk continues a prompt whose first positions are already cached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bluelm_kernels.decode_attention import (
    decode_attention,
    decode_attention_ref,
    num_splits,
    rope_and_cache,
    rope_cache_attention,
)

__all__ = ["continued_prefill_attention", "decode_attention", "decode_attention_ref", "num_splits",
           "prefill_attention", "rope_and_cache", "rope_cache_attention"]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [n, heads, P, d], k/v [n, groups, K, d]; mask [P, K] (True = may attend) or None = causal."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


def continued_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A prompt piece that continues what its slot holds: q [1, heads, n, d] at the last n of the
    K = k.shape[2] cached positions, k/v [1, groups, K, d]; query j sees keys 0..K-n+j. The
    lower-right causal bias runs on SDPA's flash / memory-efficient kernels without a [n, K] mask
    in memory; those kernels take equal head counts, so K/V are repeated for GQA."""
    from torch.nn.attention.bias import causal_lower_right

    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))
