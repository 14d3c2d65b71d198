"""Attention for generation: prefill through SDPA; decode through ``kernels.decode_attention``.

Prefill: ``scaled_dot_product_attention`` (flash / cuDNN on GPU), causal within the chunk, or with an
explicit mask when the chunk continues a prompt whose first positions are already cached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.decode_attention import decode_attention, decode_attention_ref, num_splits, rope_and_cache

__all__ = ["decode_attention", "decode_attention_ref", "num_splits", "prefill_attention", "rope_and_cache"]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [n, heads, P, d], k/v [n, groups, K, d]; mask [P, K] (True = may attend) or None = causal."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
