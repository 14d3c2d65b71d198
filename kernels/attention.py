"""Attention core: causal, or causal within packed documents; GQA without repeating K/V.

q [b, nq, s, d], k/v [b, nkv, s, d], nq a multiple of nkv. Paths:
* plain causal / full: `F.scaled_dot_product_attention(..., enable_gqa=True)` (flash or cuDNN on
  GPU; the backends index the shared K/V head, no repeat_interleave in memory).
* packed documents (document_ids [b, s] ints; a token attends to earlier-or-same positions of
  its own document): on CUDA, `torch.nn.attention.flex_attention` with a block mask (fully
  masked blocks are skipped, so cost scales with sum(len_doc^2), not s^2), compiled once per
  process (torch.compile then specializes per shape); elsewhere SDPA with an explicit boolean
  [b, 1, s, s] mask.
"""

import functools

import torch
import torch.nn.functional as F


def document_mask(document_ids, causal):
    """Boolean [b, 1, s, s]: True where query i may attend key j."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    if causal:
        s = document_ids.shape[1]
        same = same & torch.ones(s, s, dtype=torch.bool, device=same.device).tril()
    return same[:, None]


def attention_ref(q, k, v, *, causal=True, document_ids=None, scale=None):
    """Math reference: explicit K/V repeat, fp32 softmax, masked scores."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = q.shape[2]
    if document_ids is not None:
        allowed = document_mask(document_ids, causal)
    elif causal:
        allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    else:
        allowed = None
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def document_block_mask(document_ids, causal=True):
    """flex_attention BlockMask for packed documents (CUDA). Build it once per micro-batch and
    pass it to every layer's `attention(..., block_mask=...)`: building it costs more than a
    layer's attention (see docs/KERNELS.md)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        ok = document_ids[b, q_idx] == document_ids[b, kv_idx]
        return ok & (q_idx >= kv_idx) if causal else ok

    b, s = document_ids.shape
    # The mask depends on the ids (data), so it is rebuilt per call; H=None broadcasts over heads.
    return create_block_mask(mask_mod, b, None, s, s, device=document_ids.device)


def attention(q, k, v, *, causal=True, document_ids=None, scale=None, block_mask=None):
    """Scaled dot-product attention, [b, heads, s, d] layout; see the module docstring.

    block_mask: optional prebuilt `document_block_mask(document_ids, causal)` (CUDA path only)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"nq={q.shape[1]} must be a multiple of nkv={k.shape[1]}")
    gqa = q.shape[1] != k.shape[1]
    if document_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)
    if q.is_cuda:
        if block_mask is None:
            block_mask = document_block_mask(document_ids, causal)
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    mask = document_mask(document_ids, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
