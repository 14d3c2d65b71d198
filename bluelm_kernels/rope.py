"""Rotary position embedding, megatron-core semantics (bshd layout, non-interleaved rotate-half).

Matches `megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd(t, freqs,
rotary_interleaved=False)`: with rot = freqs.shape[-1] and half = rot // 2,

    out[..., :half]    = t1 * cos(f[:half]) - t2 * sin(f[:half])
    out[..., half:rot] = t2 * cos(f[half:]) + t1 * sin(f[half:])
    out[..., rot:]     = t[..., rot:]                      (tail passes through)

t: [s, b, heads, d] (any strides with a unit last-dim stride), freqs: [s, 1, 1, rot] or
[s, b, 1, rot] in fp32 (per-token positions for packed documents). cos/sin are computed from
freqs in fp32 inside the kernel and the products too, then rounded once to t.dtype; megatron
rounds cos/sin and each product to t.dtype first, so bf16 outputs differ by bf16 rounding (fp32:
identical). The backward is the transpose (the inverse rotation); freqs get no gradient.

``split_rope_qkv`` is megatron-core's QKV split + this RoPE as one op on the grouped QKV projection
output (the fused backend's training attention): its backward writes dq, dk and dv into one
d(mixed_qkv) instead of the split's backward concatenating them.
"""

import torch

from ._triton import tl, triton
from .dispatch import use_triton


def apply_rope_ref(t, freqs):
    """Pure-torch reference, the same arithmetic as megatron-core's bshd path."""
    rot = freqs.shape[-1]
    t, t_pass = t[..., :rot], t[..., rot:]
    cos_, sin_ = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    x1, x2 = torch.chunk(t, 2, dim=-1)
    t = t * cos_ + torch.cat((-x2, x1), dim=-1) * sin_
    return torch.cat((t, t_pass), dim=-1)


@triton.jit
def _head_offsets(h, sh, sg, G, GROUPED: tl.constexpr):
    # Head h's offset: h * sh, or for megatron's grouped QKV layout (G heads per group, groups sg
    # apart, heads sh apart inside a group) (h // G) * sg + (h % G) * sh.
    if GROUPED:
        off = (h // G) * sg + (h % G) * sh
    else:
        off = h * sh
    return off


@triton.jit
def _rope_heads(IN, OUT, ss_i, sb_i, sh_i, sg_i, ss_o, sb_o, sh_o, sg_o, G, s_i, b_i, tmask, NH,
                c1, s1, c2, s2, HALF, ROT, D, INVERSE: tl.constexpr, COPY_TAIL: tl.constexpr,
                GROUPED_IN: tl.constexpr, GROUPED_OUT: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    # All NH heads of a [tokens] tile, BLOCK_H heads at a time (BLOCK_H divides NH in the usual
    # cases, so no lanes idle on padded heads); s_i, b_i, tmask: [T, 1, 1]; c*/s*: [T, 1, HALF].
    d = tl.arange(0, BLOCK_HALF)[None, None, :]
    pin0 = IN + s_i * ss_i + b_i * sb_i
    pout0 = OUT + s_i * ss_o + b_i * sb_o
    for h0 in range(0, NH, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[None, :, None]
        mask = tmask & (h < NH) & (d < HALF)
        pin = pin0 + _head_offsets(h, sh_i, sg_i, G, GROUPED_IN)
        pout = pout0 + _head_offsets(h, sh_o, sg_o, G, GROUPED_OUT)
        x1 = tl.load(pin + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(pin + HALF + d, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:  # transpose of the forward map, for the gradient
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(pout + d, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(pout + HALF + d, o2.to(OUT.dtype.element_ty), mask=mask)
        if COPY_TAIL:
            dt = ROT + tl.arange(0, BLOCK_TAIL)[None, None, :]
            mt = tmask & (h < NH) & (dt < D)
            tl.store(pout + dt, tl.load(pin + dt, mask=mt, other=0.0), mask=mt)


@triton.jit
def _copy_heads(IN, OUT, ss_i, sb_i, sh_i, ss_o, sb_o, sh_o, s_i, b_i, tmask, NH, D,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # All NH heads (every one of D elements) of a [tokens] tile copied, BLOCK_H heads at a time.
    d = tl.arange(0, BLOCK_D)[None, None, :]
    pin0 = IN + s_i * ss_i + b_i * sb_i
    pout0 = OUT + s_i * ss_o + b_i * sb_o
    for h0 in range(0, NH, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[None, :, None]
        mask = tmask & (h < NH) & (d < D)
        tl.store(pout0 + h * sh_o + d, tl.load(pin0 + h * sh_i + d, mask=mask, other=0.0), mask=mask)


@triton.jit
def _rope_kernel(
    Q_IN, Q_OUT, K_IN, K_OUT, V_IN, V_OUT, FREQS, T, B, NQ, NK, HALF, ROT, D, sf_s, sf_b,
    sqs_i, sqb_i, sqh_i, sqg_i, sqs_o, sqb_o, sqh_o, sqg_o, QG,
    sks_i, skb_i, skh_i, sks_o, skb_o, skh_o, svs_i, svb_i, svh_i, svs_o, svb_o, svh_o,
    HAS_K: tl.constexpr, HAS_V: tl.constexpr, INVERSE: tl.constexpr, COPY_TAIL: tl.constexpr,
    GROUPED_Q_IN: tl.constexpr, GROUPED_Q_OUT: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # BLOCK_T tokens per program, every head of q and k: cos/sin are computed once per token
    # (fp32, accurate) and reused for all heads of both. With HAS_V the program also copies its
    # tokens' NK heads of V_IN to V_OUT (the value's gradient into its slot of d(mixed_qkv)).
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]
    tmask = tok < T
    s_i = (tok // B).to(tl.int64)
    b_i = (tok % B).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, None, :]
    fp = FREQS + s_i * sf_s + b_i * sf_b
    fmask = tmask & (d < HALF)
    f1 = tl.load(fp + d, mask=fmask, other=0.0).to(tl.float32)
    f2 = tl.load(fp + HALF + d, mask=fmask, other=0.0).to(tl.float32)
    c1, s1, c2, s2 = tl.cos(f1), tl.sin(f1), tl.cos(f2), tl.sin(f2)
    _rope_heads(Q_IN, Q_OUT, sqs_i, sqb_i, sqh_i, sqg_i, sqs_o, sqb_o, sqh_o, sqg_o, QG, s_i, b_i,
                tmask, NQ, c1, s1, c2, s2, HALF, ROT, D, INVERSE, COPY_TAIL, GROUPED_Q_IN,
                GROUPED_Q_OUT, BLOCK_H, BLOCK_HALF, BLOCK_TAIL)
    if HAS_K:
        _rope_heads(K_IN, K_OUT, sks_i, skb_i, skh_i, 0, sks_o, skb_o, skh_o, 0, 1, s_i, b_i,
                    tmask, NK, c1, s1, c2, s2, HALF, ROT, D, INVERSE, COPY_TAIL, False, False,
                    BLOCK_H, BLOCK_HALF, BLOCK_TAIL)
    if HAS_V:
        _copy_heads(V_IN, V_OUT, svs_i, svb_i, svh_i, svs_o, svb_o, svh_o, s_i, b_i, tmask, NK, D,
                    BLOCK_H, BLOCK_D)


# Launch shape, chosen by bluelm_kernels/bench (see docs/KERNELS.md): tokens per program, heads per
# inner step (capped by the largest power of two dividing the head counts) and warps.
TUNE = {"tokens": 4, "heads": 4, "warps": 4, "bwd_tokens": 4, "bwd_heads": 4, "bwd_warps": 4}


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _pow2_divisor(n):
    return n & -n if n > 0 else 1


def _heads(t):
    """(heads, head stride, group stride, heads per group, grouped) of t [s, b, h, d], or of a view
    in megatron's grouped QKV layout [s, b, groups, heads per group, d] (grouped only where the
    heads are not evenly spaced: one group, one head a group or adjacent groups are plain)."""
    if t.dim() == 4:
        return t.shape[2], t.stride(2), 0, 1, False
    g, hpg = t.shape[2], t.shape[3]
    if hpg == 1:
        return g, t.stride(2), 0, 1, False
    if g == 1 or t.stride(2) == hpg * t.stride(3):
        return g * hpg, t.stride(3), 0, 1, False
    return g * hpg, t.stride(3), t.stride(2), hpg, True


def _launch(pairs, freqs, inverse, copy_tail, value=None):
    """pairs: [(in, out)] for q (and k); every tensor [s, b, h, d] (q's in or out may also be a
    grouped [s, b, groups, heads per group, d] view) with unit last stride. value: (in, out) of
    k's head count, copied in the same launch."""
    (qi, qo), (ki, ko) = pairs[0], pairs[-1]
    s, b, d = qi.shape[0], qi.shape[1], qi.shape[-1]
    nq, sqh_i, sqg_i, g_i, grouped_i = _heads(qi)
    nq_o, sqh_o, sqg_o, g_o, grouped_o = _heads(qo)
    if nq_o != nq or (grouped_i and grouped_o and g_i != g_o):
        raise ValueError(f"rope: q in {tuple(qi.shape)} and out {tuple(qo.shape)} differ in heads")
    nk = ki.shape[2]
    vi, vo = value if value is not None else (ki, ko)
    if vi.shape[2] != nk or vo.shape[2] != nk:
        raise ValueError(f"rope: value heads {vi.shape[2]} / {vo.shape[2]} are not the key's {nk}")
    rot = freqs.shape[-1]
    if rot % 2 or rot > d:
        raise ValueError(f"rotary dim {rot} must be even and <= head dim {d}")
    if s * b == 0:
        return
    sf_b = freqs.stride(1) if freqs.shape[1] == b and b > 1 else 0
    half = rot // 2
    bhalf = triton.next_power_of_2(half)
    pre = "bwd_" if inverse else ""
    bh = min(TUNE[pre + "heads"], _pow2_divisor(nq), _pow2_divisor(nk))
    bt = TUNE[pre + "tokens"]
    warps = max(1, min(TUNE[pre + "warps"], bt * bh * bhalf // 256))
    _rope_kernel[(triton.cdiv(s * b, bt),)](
        qi, qo, ki, ko, vi, vo, freqs, s * b, b, nq, nk, half, rot, d, freqs.stride(0), sf_b,
        qi.stride(0), qi.stride(1), sqh_i, sqg_i, qo.stride(0), qo.stride(1), sqh_o, sqg_o,
        g_i if grouped_i else g_o,
        *ki.stride()[:3], *ko.stride()[:3], *vi.stride()[:3], *vo.stride()[:3],
        HAS_K=len(pairs) > 1, HAS_V=value is not None, INVERSE=inverse,
        COPY_TAIL=copy_tail and rot < d, GROUPED_Q_IN=grouped_i, GROUPED_Q_OUT=grouped_o,
        BLOCK_T=bt, BLOCK_H=bh, BLOCK_HALF=bhalf,
        BLOCK_TAIL=triton.next_power_of_2(max(d - rot, 1)), BLOCK_D=triton.next_power_of_2(d),
        num_warps=warps,
    )


def _prep_freqs(freqs):
    return _unit_last(freqs.float())


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs):
        t, freqs = _unit_last(t), _prep_freqs(freqs)
        out = torch.empty(t.shape, device=t.device, dtype=t.dtype)
        _launch([(t, out)], freqs, inverse=False, copy_tail=True)
        ctx.save_for_backward(freqs)
        return out

    @staticmethod
    def backward(ctx, dy):
        (freqs,) = ctx.saved_tensors
        dy = _unit_last(dy)
        dx = torch.empty(dy.shape, device=dy.device, dtype=dy.dtype)
        _launch([(dy, dx)], freqs, inverse=True, copy_tail=True)
        return dx, None


def _rope_qk_backward(ctx, dq, dk):
    """Gradients of q and k: the inverse rotation of both, one launch."""
    (freqs,) = ctx.saved_tensors
    dq, dk = _unit_last(dq), _unit_last(dk)
    gq = torch.empty(dq.shape, device=dq.device, dtype=dq.dtype)
    gk = torch.empty(dk.shape, device=dk.device, dtype=dk.dtype)
    _launch([(dq, gq), (dk, gk)], freqs, inverse=True, copy_tail=True)
    return gq, gk, None


class _RopeQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, freqs):
        q, k, freqs = _unit_last(q), _unit_last(k), _prep_freqs(freqs)
        qo = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        ko = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        _launch([(q, qo), (k, ko)], freqs, inverse=False, copy_tail=True)
        ctx.save_for_backward(freqs)
        return qo, ko

    backward = staticmethod(_rope_qk_backward)


class _RopeQKInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, freqs):
        freqs = _prep_freqs(freqs)
        _launch([(q, q), (k, k)], freqs, inverse=False, copy_tail=False)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(freqs)
        return q, k

    backward = staticmethod(_rope_qk_backward)


def apply_rope(t, freqs):
    """RoPE on t [s, b, h, d] with freqs [s, 1|b, 1, rot]; returns a new tensor."""
    if not use_triton(t):
        return apply_rope_ref(t, freqs)
    return _Rope.apply(t, freqs)


def apply_rope_qk(q, k, freqs):
    """Rotate q [s, b, nq, d] and k [s, b, nkv, d] into new tensors, one launch (and one for the
    backward) instead of one per tensor; returns (q_rot, k_rot). Inputs may be any views with a
    unit last-dim stride (e.g. torch.split outputs of a fused QKV projection)."""
    if not use_triton(q):
        return apply_rope_ref(q, freqs), apply_rope_ref(k, freqs)
    return _RopeQK.apply(q, k, freqs)


def apply_rope_qk_(q, k, freqs):
    """Rotate q [s, b, nq, d] and k [s, b, nkv, d] in place, one launch; returns (q, k).

    q and k need a unit last-dim stride (any other strides are fine, e.g. views into a fused
    QKV buffer). Under autograd they must be tensors that may be modified in place (not leaves
    that require grad, nor outputs of multi-output views such as torch.split).
    """
    if not use_triton(q):
        q.copy_(apply_rope_ref(q, freqs))
        k.copy_(apply_rope_ref(k, freqs))
        return q, k
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("apply_rope_qk_ needs a unit last-dim stride on q and k")
    return _RopeQKInplace.apply(q, k, freqs)


def _grouped_slots(mixed_qkv, heads_per_group):
    """Views of megatron's fused QKV projection output ``[s, b, groups, (hpg + 2) * d]`` (per group
    its hpg query heads, then one key and one value head): (q [s, b, groups, hpg, d], k, v
    [s, b, groups, d])."""
    s, b, g, w = mixed_qkv.shape
    m = mixed_qkv.view(s, b, g, heads_per_group + 2, w // (heads_per_group + 2))
    return m[:, :, :, :heads_per_group], m[:, :, :, heads_per_group], m[:, :, :, heads_per_group + 1]


def _check_shapes(mixed_qkv, freqs, heads_per_group):
    if mixed_qkv.dim() != 4 or mixed_qkv.shape[-1] % (heads_per_group + 2):
        raise ValueError(f"split_rope_qkv: mixed_qkv {tuple(mixed_qkv.shape)} is not [s, b, groups, "
                         f"(heads per group {heads_per_group} + 2) x head dim]")
    s, b = mixed_qkv.shape[:2]
    if freqs.dim() != 4 or freqs.shape[0] < s or freqs.shape[1] not in (1, b) or freqs.shape[2] != 1:
        raise ValueError(f"split_rope_qkv: freqs {tuple(freqs.shape)} is not [>= {s}, 1 | {b}, 1, rot] "
                         f"for mixed_qkv's {s} positions x {b} rows")


class _SplitRopeQKV(torch.autograd.Function):
    """megatron-core's QKV split + RoPE of q and k, reading q and k from their slots of the QKV
    projection's output; the backward writes the rotated-back dq, dk and dv straight into one
    d(mixed_qkv), so no concatenation of the three gradients runs."""

    @staticmethod
    def forward(ctx, mixed_qkv, freqs, heads_per_group):
        q, k, v = _grouped_slots(mixed_qkv, heads_per_group)
        freqs = _prep_freqs(freqs)
        s, b, g, _, d = q.shape
        qo = torch.empty(s, b, g * heads_per_group, d, device=q.device, dtype=q.dtype)
        ko = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        _launch([(q, qo), (k, ko)], freqs, inverse=False, copy_tail=True)
        ctx.save_for_backward(freqs)
        ctx.heads_per_group = heads_per_group
        return qo, ko, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (freqs,) = ctx.saved_tensors
        dq, dk, dv = _unit_last(dq), _unit_last(dk), _unit_last(dv)
        s, b, g, d = dk.shape
        # Every element is written below: q's and k's slots (tails included) by the inverse
        # rotation, v's by the copy.
        dmixed = torch.empty(s, b, g, (ctx.heads_per_group + 2) * d, device=dk.device, dtype=dk.dtype)
        gq, gk, gv = _grouped_slots(dmixed, ctx.heads_per_group)
        _launch([(dq, gq), (dk, gk)], freqs, inverse=True, copy_tail=True, value=(dv, gv))
        return dmixed, None, None


def split_rope_qkv_ref(mixed_qkv, freqs, heads_per_group):
    """megatron-core's split of the QKV output (``SelfAttention.get_query_key_value_tensors``) and
    the reference RoPE of q and k."""
    s, b, g, w = mixed_qkv.shape
    d = w // (heads_per_group + 2)
    q, k, v = torch.split(mixed_qkv, [heads_per_group * d, d, d], dim=3)
    q = q.reshape(s, b, -1, d)
    return apply_rope_ref(q, freqs), apply_rope_ref(k, freqs), v


def split_rope_qkv(mixed_qkv, freqs, heads_per_group):
    """Split megatron's fused QKV output ``mixed_qkv [s, b, groups, (hpg + 2) * d]`` and rotate q and
    k (freqs ``[s, 1|b, 1, rot]``): returns (q_rot [s, b, groups * hpg, d], k_rot [s, b, groups, d],
    v [s, b, groups, d]) as megatron's split + ``apply_rope_qk`` give them (q_rot, k_rot new
    contiguous tensors, v a view of mixed_qkv). One launch each way; the backward's launch writes
    dq, dk (rotated back) and dv into their slots of one new d(mixed_qkv)."""
    _check_shapes(mixed_qkv, freqs, heads_per_group)
    if not use_triton(mixed_qkv):
        return split_rope_qkv_ref(mixed_qkv, freqs, heads_per_group)
    return _SplitRopeQKV.apply(_unit_last(mixed_qkv), freqs, heads_per_group)
