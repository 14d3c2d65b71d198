"""Decode attention for the generation engine: one query per row against that row's cached keys.

The KV cache is per slot, [slots, groups, capacity, d], and row b attends to its first
``lengths[b]`` positions. Triton split-K kernel (flash-decoding): one program per (row, KV group, key
chunk) loads the group's query heads once — GQA without repeating K/V — streams the chunk's keys and
values with an online softmax and writes its partial (acc, max, sum); the chunk program that arrives
last at its (row, group) arrival counter (an atomic) merges the group's chunks and writes the output,
so several chunks cost one launch, not two (one chunk: normalized in place). Chunks past a row's
length exit at once, so a short row costs what its keys cost, not the capacity.

``rope_and_cache``: the decode step's RoPE (rotate-half) of the query heads and key of the fused QKV
output at each row's position, with the key and value written into the row's cache slot — one launch
per layer instead of a dozen small ones.

Each has a torch reference (``*_ref``) that runs on CPU and is what the interpreter tests compare with;
``use_triton(x)`` picks the kernel on CUDA (and under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import math

import torch

from ._triton import tl, triton
from .dispatch import use_triton


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """q [b, heads, d], k/v [b, groups, capacity, d], lengths [b] -> [b, heads, d] (torch, any device)."""
    b, heads, d = q.shape
    groups = k.shape[1]
    qg = q.view(b, groups, heads // groups, d).float()
    scores = torch.einsum("bgqd,bgkd->bgqk", qg, k.float()) / math.sqrt(d)
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None]  # [b, K]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bgqk,bgkd->bgqd", scores.softmax(-1), v.float())
    return out.reshape(b, heads, d).to(q.dtype)


# Keys per tile of the decode kernel, and the least keys per chunk ``num_splits`` gives: one constant so
# the engine's chunk count and the kernel's tile agree (decode_attention_bench.py compares 64 with 32).
BLOCK_N = 64


def num_splits(rows: int, groups: int, capacity: int, device: torch.device, block: int = BLOCK_N,
               sms: int | None = None) -> int:
    """Key chunks per (row, group) so that the decode grid fills the GPU at small batches (about two
    programs per SM, chunks of at least ``block`` keys). ``sms`` overrides the device's SM count (CPU:
    1 chunk unless given)."""
    if sms is None:
        if device.type != "cuda":
            return 1
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, math.ceil(2 * sms / max(1, rows * groups)))
    return max(1, min(want, math.ceil(capacity / block)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     splits: int = 1) -> torch.Tensor:
    """q [b, heads, d], k/v [b, groups, capacity, d], lengths [b] -> [b, heads, d]; ``splits`` key chunks
    per (row, group) (``num_splits``)."""
    if not use_triton(q):
        return decode_attention_ref(q, k, v, lengths)
    return _decode_attention_triton(q, k, v, lengths, splits)


def rope_cache_attention(qkv: torch.Tensor, lengths: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         kc: torch.Tensor, vc: torch.Tensor, heads: int, groups: int, splits: int = 1) -> torch.Tensor:
    """``rope_and_cache`` at positions lengths - 1, then ``decode_attention`` over cache slots
    0..rows-1 at ``lengths``, in one launch on CUDA (the split merge included): -> [rows, heads, d]."""
    rows = qkv.shape[0]
    if not use_triton(qkv):
        q = rope_and_cache_ref(qkv, lengths - 1, cos, sin, kc, vc, heads, groups)
        return decode_attention_ref(q, kc[:rows], vc[:rows], lengths)
    assert qkv.stride(1) == 1 and kc.stride(3) == 1 and vc.stride(3) == 1 and cos.stride(1) == 1
    assert kc.shape[1] == groups
    return _decode_attention_triton(None, kc[:rows], vc[:rows], lengths, splits, rope=(qkv, cos, sin, heads))


def rope_and_cache_ref(qkv, pos, cos, sin, kc, vc, heads: int, groups: int) -> torch.Tensor:
    rows, d = qkv.shape[0], kc.shape[-1]
    npg = heads // groups
    mixed = qkv.view(rows, groups, npg + 2, d)
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]

    def rotate(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * c + torch.cat((-t2, t1), dim=-1) * s

    slot = torch.arange(rows, device=qkv.device)
    kc[slot, :, pos] = rotate(mixed[:, :, npg])
    vc[slot, :, pos] = mixed[:, :, npg + 1]
    return rotate(mixed[:, :, :npg].reshape(rows, heads, d))


def rope_and_cache(qkv: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor,
                   vc: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """qkv [rows, groups*(heads/groups+2)*d] (megatron's per-group layout) -> rotated q [rows, heads, d];
    the rotated k and v written into cache slots 0..rows-1 at ``pos``. cos/sin [capacity, d]."""
    if not use_triton(qkv):
        return rope_and_cache_ref(qkv, pos, cos, sin, kc, vc, heads, groups)
    rows, d = qkv.shape[0], kc.shape[-1]
    npg = heads // groups
    q = torch.empty(rows, heads, d, dtype=qkv.dtype, device=qkv.device)
    assert qkv.stride(1) == 1 and kc.stride(3) == 1 and vc.stride(3) == 1 and cos.stride(1) == 1
    _rope_cache_kernel[(rows, groups)](
        qkv, pos, cos, sin, q, kc, vc, qkv.stride(0), q.stride(0), q.stride(1), kc.stride(0), kc.stride(1),
        kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2), cos.stride(0),
        NPG=npg, BLOCK_H=triton.next_power_of_2(npg), HALF=d // 2, num_warps=1)
    return q


@triton.jit
def _decode_kernel(Q, K, V, Lens, Out, M, L,
                   sq_b, sq_h, sk_b, sk_g, sk_n, sv_b, sv_g, sv_n,
                   so_b, so_h, so_s, sm_b, sm_h,
                   scale_log2, chunk, QKV, COS, SIN, s_qkv, s_cos,
                   Res, Cnt, sr_b, sr_h,
                   SINGLE: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                   D: tl.constexpr, ROPE: tl.constexpr, FUSED: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_S: tl.constexpr, SB: tl.constexpr):
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
    if ROPE:
        # RoPE + cache write fused in (rope_and_cache's math, the same bits): the new token sits at
        # position length - 1; q comes rotated from the fused QKV row; the program whose chunk holds
        # that position writes the rotated key and the value into the cache before its loop reads it.
        pos = length - 1
        half = D // 2
        swap = (offs_d + half) % D
        c = tl.load(COS + pos * s_cos + offs_d).to(tl.float32)  # the tables repeat each half
        sn = tl.load(SIN + pos * s_cos + offs_d).to(tl.float32)
        sn = tl.where(offs_d < half, -sn, sn)
        base = QKV + b * s_qkv + g * (GROUP + 2) * D
        qp = base + offs_h[:, None] * D
        q1 = tl.load(qp + offs_d[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(qp + swap[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)
        q = (q1 * c[None, :] + q2 * sn[None, :]).to(K.dtype.element_ty)
        if pos // chunk == s:
            kp = base + GROUP * D
            knew = tl.load(kp + offs_d).to(tl.float32) * c + tl.load(kp + swap).to(tl.float32) * sn
            tl.store(K + b * sk_b + g * sk_g + pos * sk_n + offs_d, knew.to(K.dtype.element_ty))
            tl.store(V + b * sv_b + g * sv_g + pos * sv_n + offs_d, tl.load(base + (GROUP + 1) * D + offs_d))
            tl.debug_barrier()  # the stores above are read back by other threads of this program
    else:
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
    if SINGLE:  # one chunk: normalize here, write the output dtype
        tl.store(optr, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=hmask[:, None])
    else:
        tl.store(optr, acc, mask=hmask[:, None])
        tl.store(M + b * sm_b + heads * sm_h + s, m_i, mask=hmask)
        tl.store(L + b * sm_b + heads * sm_h + s, l_i, mask=hmask)
        if FUSED:
            # Serial split-K reduction: the chunk program that arrives last at its (row, group) counter
            # merges every chunk's partials. The barrier orders all threads' partial stores before the
            # (single-thread) release half of the atomic; its acquire half plus the barrier after it
            # make the other programs' stores visible to every thread of the last program.
            splits = tl.num_programs(2)
            cnt = Cnt + b * tl.num_programs(1) + g
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if arrived == splits - 1:
                tl.debug_barrier()
                _merge_group(Out, M, L, Res, b, g, splits, so_b, so_h, so_s, sm_b, sm_h, sr_b, sr_h,
                             GROUP, BLOCK_G, BLOCK_S, SB, D)
                tl.store(cnt, 0)  # zero at rest: the next launch (or graph replay) counts from 0


@triton.jit
def _merge_group(Part, M, L, Res, b, g, splits, sp_b, sp_h, sp_s, sm_b, sm_h, sr_b, sr_h,
                 GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, SB: tl.constexpr,
                 D: tl.constexpr):
    """Row b, KV group g: merge the ``splits`` chunks' (acc, m, l) of the group's query heads into the
    normalized output, all heads in one tile (one round of loads at a few chunks). Loads bypass L1
    (``.cg``): the partials were written by other SMs during this launch."""
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < GROUP
    heads = g * GROUP + offs_g
    offs_s = tl.arange(0, BLOCK_S)
    mrow = M + b * sm_b + heads[:, None] * sm_h
    lrow = L + b * sm_b + heads[:, None] * sm_h
    msk = gmask[:, None] & (offs_s[None, :] < splits)
    offs_d = tl.arange(0, D)
    prow = Part + b * sp_b + heads[:, None, None] * sp_h + offs_d[None, None, :]
    m = tl.load(mrow + offs_s[None, :], mask=msk, other=float("-inf"), cache_modifier=".cg")
    lsum = tl.load(lrow + offs_s[None, :], mask=msk, other=0.0, cache_modifier=".cg")
    if SB == BLOCK_S:  # every chunk in one tile: the partials load with m and l, one round of loads
        part = tl.load(prow + offs_s[None, :, None] * sp_s, mask=msk[:, :, None], other=0.0, cache_modifier=".cg")
    top = tl.where(gmask, tl.max(m, 1), 0.0)  # chunk 0 holds key 0: finite for every real head
    w = tl.where(msk, tl.math.exp2(m - top[:, None]), 0.0)  # empty chunks: m = -inf -> weight 0
    denom = tl.sum(lsum * w, 1)
    if SB == BLOCK_S:
        acc = tl.sum(part * w[:, :, None], 1)
    else:  # SB chunks at a time (a tile of <= 128 (head, chunk) pairs: no spills at D = 128), each
        # tile's weights from its own m
        offs_c = tl.arange(0, SB)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for s0 in range(0, splits, SB):
            sc = s0 + offs_c
            cm = gmask[:, None] & (sc[None, :] < splits)
            mc = tl.load(mrow + sc[None, :], mask=cm, other=float("-inf"), cache_modifier=".cg")
            wc = tl.where(cm, tl.math.exp2(mc - top[:, None]), 0.0)
            part = tl.load(prow + sc[None, :, None] * sp_s, mask=cm[:, :, None], other=0.0, cache_modifier=".cg")
            acc += tl.sum(part * wc[:, :, None], 1)
    out = acc / tl.where(gmask, denom, 1.0)[:, None]
    tl.store(Res + b * sr_b + heads[:, None] * sr_h + offs_d[None, :], out.to(Res.dtype.element_ty),
             mask=gmask[:, None])


# The two-launch merge, kept as the baseline that bluelm_kernels/bench/decode_attention_bench.py times
# the fused merge against (``fused=False``) and that the tests check alongside it; the engine's calls
# always take the fused merge.
@triton.jit
def _combine_kernel(Part, M, L, Out, sp_b, sp_h, sp_s, sm_b, sm_h, so_b, so_h, splits,
                    BLOCK_S: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < splits
    m = tl.load(M + b * sm_b + h * sm_h + offs_s, mask=smask, other=float("-inf"))
    lsum = tl.load(L + b * sm_b + h * sm_h + offs_s, mask=smask, other=0.0)
    top = tl.max(m, 0)
    w = tl.where(smask, tl.math.exp2(m - top), 0.0)  # empty chunks: m = -inf -> weight 0
    offs_d = tl.arange(0, D)
    part = tl.load(Part + b * sp_b + h * sp_h + offs_s[:, None] * sp_s + offs_d[None, :],
                   mask=smask[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(Out + b * so_b + h * so_h + offs_d, out.to(Out.dtype.element_ty))

@triton.jit
def _rope_cache_kernel(QKV, POS, COS, SIN, QO, KC, VC, s_qkv, s_qo_b, s_qo_h, s_kc_s, s_kc_g, s_kc_n,
                       s_vc_s, s_vc_g, s_vc_n, s_cos,
                       NPG: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    """Row b, KV group g of the fused QKV output: rotate the group's query heads and key at the
    row's position (rotate-half RoPE), write the rotated queries, and the key and value into the
    row's cache slot at that position. One launch per layer instead of a dozen small ones."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    pos = tl.load(POS + b)
    offs = tl.arange(0, HALF)
    c = tl.load(COS + pos * s_cos + offs).to(tl.float32)
    sn = tl.load(SIN + pos * s_cos + offs).to(tl.float32)
    base = QKV + b * s_qkv + g * (NPG + 2) * 2 * HALF
    hh = tl.arange(0, BLOCK_H)
    hm = hh < NPG
    qp = base + hh[:, None] * 2 * HALF + offs[None, :]
    q1 = tl.load(qp, mask=hm[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=hm[:, None], other=0.0).to(tl.float32)
    qo = QO + b * s_qo_b + (g * NPG + hh)[:, None] * s_qo_h + offs[None, :]
    tl.store(qo, (q1 * c[None, :] - q2 * sn[None, :]).to(QO.dtype.element_ty), mask=hm[:, None])
    tl.store(qo + HALF, (q2 * c[None, :] + q1 * sn[None, :]).to(QO.dtype.element_ty), mask=hm[:, None])
    kp = base + NPG * 2 * HALF + offs
    k1 = tl.load(kp).to(tl.float32)
    k2 = tl.load(kp + HALF).to(tl.float32)
    kc = KC + b * s_kc_s + g * s_kc_g + pos * s_kc_n + offs
    tl.store(kc, (k1 * c - k2 * sn).to(KC.dtype.element_ty))
    tl.store(kc + HALF, (k2 * c + k1 * sn).to(KC.dtype.element_ty))
    vp = base + (NPG + 1) * 2 * HALF + offs
    vc = VC + b * s_vc_s + g * s_vc_g + pos * s_vc_n + offs
    tl.store(vc, tl.load(vp))
    tl.store(vc + HALF, tl.load(vp + HALF))



_COUNTERS: dict[tuple, torch.Tensor] = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """The fused kernel's per-(row, group) arrival counters: int32 zeros, one buffer per (device, size)
    kept for the process (every launch, layer and captured graph of that size reuses it; the last
    program of each (row, group) puts its counter back to 0). Calls sharing a buffer must not run at
    the same time on different streams (the engine runs one decode step at a time per device)."""
    key = (device, n)
    cnt = _COUNTERS.get(key)
    if cnt is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A buffer made inside a capture would live in the graph's pool and be zeroed only by the
            # capture's own memset: the engine's eager warm-up call is what allocates it.
            raise RuntimeError(f"bluelm_kernels/decode_attention.py: no arrival counters yet for {n} "
                               f"(rows x groups) on {device}; run the call once outside CUDA-graph capture")
        cnt = _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return cnt


def _decode_attention_triton(q, k, v, lengths, splits, rope=None, *, fused: bool = True, block_n: int = BLOCK_N):
    """``rope``: (qkv, cos, sin, heads) — q is then taken rotated from the fused QKV rows and the new
    key / value written into k / v at position lengths - 1 (``q`` gives only the shape: None).
    ``fused``: several chunks are merged inside the decode kernel by the last-arriving chunk program
    of each (row, group); False runs the separate ``_combine_kernel`` launch instead (the reference
    the fused merge is benchmarked against). ``block_n``: keys per tile (a chunk is a multiple)."""
    if rope is not None:
        qkv, cos, sin, heads = rope
        b, d = qkv.shape[0], k.shape[3]
        q, q_strides = qkv, (0, 0)  # not read: the queries come from qkv
    else:
        b, heads, d = q.shape
        q_strides = (q.stride(0), q.stride(1))
    groups, capacity = k.shape[1], k.shape[2]
    group = heads // groups
    if splits < 1:
        raise ValueError(f"bluelm_kernels/decode_attention.py: splits must be >= 1, got {splits}")
    chunk = math.ceil(math.ceil(capacity / splits) / block_n) * block_n
    single = splits == 1
    fused = fused and not single
    if single:
        out = torch.empty(b, heads, 1, d, device=q.device, dtype=q.dtype)
        m = lsum = out  # unused
        sm = (0, 0)
    else:
        out = torch.empty(b, heads, splits, d, device=q.device, dtype=torch.float32)
        m = torch.empty(b, heads, splits, device=q.device, dtype=torch.float32)
        lsum = torch.empty_like(m)
        sm = (m.stride(0), m.stride(1))
    if fused:
        res = torch.empty(b, heads, d, device=q.device, dtype=q.dtype)
        cnt = _arrival_counters(q.device, b * groups)
    else:
        res, cnt = out, m  # unused
    block_s = triton.next_power_of_2(splits)
    block_g = triton.next_power_of_2(group)
    assert k.stride(3) == 1 and v.stride(3) == 1 and q.stride(-1) == 1
    _decode_kernel[(b, groups, splits)](
        q, k, v, lengths, out, m, lsum,
        *q_strides, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), sm[0], sm[1],
        (1.0 / math.sqrt(d)) * 1.4426950408889634, chunk,
        *((qkv, cos, sin, qkv.stride(0), cos.stride(0)) if rope is not None else (q, q, q, 0, 0)),
        res, cnt, res.stride(0) if fused else 0, res.stride(1) if fused else 0,
        SINGLE=single, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, D=d,
        ROPE=rope is not None, FUSED=fused, BLOCK_G=block_g, BLOCK_S=block_s,
        SB=max(1, min(block_s, 128 // block_g)), num_warps=4, num_stages=2)
    if single:
        return out[:, :, 0]
    if fused:
        return res
    res = torch.empty(b, heads, d, device=q.device, dtype=q.dtype)
    _combine_kernel[(b, heads)](out, m, lsum, res, out.stride(0), out.stride(1), out.stride(2), m.stride(0),
                                m.stride(1), res.stride(0), res.stride(1), splits,
                                BLOCK_S=triton.next_power_of_2(splits), D=d, num_warps=1)
    return res
