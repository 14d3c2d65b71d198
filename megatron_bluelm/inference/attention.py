"""Attention for generation: decode (one query per row against its own cached keys) and prefill.

Decode reads only each row's valid keys: the KV cache is per slot, [slots, groups, capacity, d], and
row b attends to its first ``lengths[b]`` positions. On CUDA a Triton split-K kernel (flash-decoding):
one program per (row, KV group, key chunk) loads the group's query heads once — GQA without
repeating K/V — streams the chunk's keys and values with an online softmax, and a small combine
merges the chunks. Chunks past a row's length exit at once, so a short row costs what its keys
cost, not the cache's capacity. On CPU (and as the tests' reference) the same function in torch.

Prefill: ``scaled_dot_product_attention`` (flash / cuDNN on GPU), causal within the chunk, or with
an explicit mask when the chunk continues a prompt whose first positions are already cached.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use the torch path
    triton = None


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [n, heads, P, d], k/v [n, groups, K, d]; mask [P, K] (True = may attend) or None = causal."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """q [b, heads, d], k/v [b, groups, capacity, d], lengths [b] -> [b, heads, d] (torch, any device)."""
    b, heads, d = q.shape
    groups = k.shape[1]
    qg = q.view(b, groups, heads // groups, d).float()
    scores = torch.einsum("bgqd,bgkd->bgqk", qg, k.float()) / math.sqrt(d)
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None]  # [b, K]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bgqk,bgkd->bgqd", scores.softmax(-1), v.float())
    return out.reshape(b, heads, d).to(q.dtype)


def num_splits(rows: int, groups: int, capacity: int, device: torch.device, block: int = 64) -> int:
    """Key chunks per (row, group) so that the decode grid fills the GPU at small batches."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, math.ceil(2 * sms / max(1, rows * groups)))
    return max(1, min(want, math.ceil(capacity / block)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     splits: int = 1) -> torch.Tensor:
    if q.device.type != "cuda" or triton is None:
        return decode_attention_reference(q, k, v, lengths)
    return _decode_attention_triton(q, k, v, lengths, splits)


if triton is not None:

    @triton.jit
    def _decode_kernel(Q, K, V, Lens, Out, M, L,
                       sq_b, sq_h, sk_b, sk_g, sk_n, sv_b, sv_g, sv_n,
                       so_b, so_h, so_s, sm_b, sm_h,
                       scale_log2, chunk,
                       GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        g = tl.program_id(1)
        s = tl.program_id(2)
        length = tl.load(Lens + b).to(tl.int32)
        start = s * chunk
        end = tl.minimum(start + chunk, length)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        hmask = offs_h < GROUP
        heads = g * GROUP + offs_h
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :], mask=hmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        kbase = K + b * sk_b + g * sk_g
        vbase = V + b * sv_b + g * sv_g
        for n0 in range(start, end, BLOCK_N):
            n = n0 + offs_n
            nmask = n < end
            k = tl.load(kbase + n[:, None] * sk_n + offs_d[None, :], mask=nmask[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k)) * scale_log2
            qk = tl.where(nmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            vv = tl.load(vbase + n[:, None] * sv_n + offs_d[None, :], mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
            m_i = m_new
        optr = Out + b * so_b + heads[:, None] * so_h + s * so_s + offs_d[None, :]
        tl.store(optr, acc, mask=hmask[:, None])
        tl.store(M + b * sm_b + heads * sm_h + s, m_i, mask=hmask)
        tl.store(L + b * sm_b + heads * sm_h + s, l_i, mask=hmask)


def _decode_attention_triton(q, k, v, lengths, splits):
    b, heads, d = q.shape
    groups, capacity = k.shape[1], k.shape[2]
    group = heads // groups
    block_n = 64
    chunk = math.ceil(math.ceil(capacity / splits) / block_n) * block_n
    out = torch.empty(b, heads, splits, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b, heads, splits, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    assert k.stride(3) == 1 and v.stride(3) == 1 and q.stride(2) == 1
    _decode_kernel[(b, groups, splits)](
        q, k, v, lengths, out, m, lsum,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), m.stride(0), m.stride(1),
        (1.0 / math.sqrt(d)) * 1.4426950408889634, chunk,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, D=d,
        num_warps=4, num_stages=2)
    if splits == 1:
        return (out[:, :, 0] / lsum).to(q.dtype)
    top = m.amax(-1, keepdim=True)
    w = torch.exp2(m - top)  # empty chunks: m = -inf -> weight 0
    return ((out * w[..., None]).sum(2) / (lsum * w).sum(-1, keepdim=True)).to(q.dtype)
