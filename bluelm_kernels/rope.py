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
def _rope_heads(IN, OUT, ss_i, sb_i, sh_i, ss_o, sb_o, sh_o, s_i, b_i, tmask, NH, c1, s1, c2,
                s2, HALF, ROT, D, INVERSE: tl.constexpr, COPY_TAIL: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    # All NH heads of a [tokens] tile, BLOCK_H heads at a time (BLOCK_H divides NH in the usual
    # cases, so no lanes idle on padded heads); s_i, b_i, tmask: [T, 1, 1]; c*/s*: [T, 1, HALF].
    d = tl.arange(0, BLOCK_HALF)[None, None, :]
    pin0 = IN + s_i * ss_i + b_i * sb_i
    pout0 = OUT + s_i * ss_o + b_i * sb_o
    for h0 in range(0, NH, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[None, :, None]
        mask = tmask & (h < NH) & (d < HALF)
        pin = pin0 + h * sh_i
        pout = pout0 + h * sh_o
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
def _rope_kernel(
    Q_IN, Q_OUT, K_IN, K_OUT, FREQS, T, B, NQ, NK, HALF, ROT, D, sf_s, sf_b,
    sqs_i, sqb_i, sqh_i, sqs_o, sqb_o, sqh_o, sks_i, skb_i, skh_i, sks_o, skb_o, skh_o,
    HAS_K: tl.constexpr, INVERSE: tl.constexpr, COPY_TAIL: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    # BLOCK_T tokens per program, every head of q and k: cos/sin are computed once per token
    # (fp32, accurate) and reused for all heads of both.
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
    _rope_heads(Q_IN, Q_OUT, sqs_i, sqb_i, sqh_i, sqs_o, sqb_o, sqh_o, s_i, b_i, tmask, NQ,
                c1, s1, c2, s2, HALF, ROT, D, INVERSE, COPY_TAIL, BLOCK_H, BLOCK_HALF,
                BLOCK_TAIL)
    if HAS_K:
        _rope_heads(K_IN, K_OUT, sks_i, skb_i, skh_i, sks_o, skb_o, skh_o, s_i, b_i, tmask, NK,
                    c1, s1, c2, s2, HALF, ROT, D, INVERSE, COPY_TAIL, BLOCK_H, BLOCK_HALF,
                    BLOCK_TAIL)


# Launch shape, chosen by bluelm_kernels/bench (see docs/KERNELS.md): tokens per program, heads per
# inner step (capped by the largest power of two dividing the head counts) and warps.
TUNE = {"tokens": 4, "heads": 4, "warps": 4, "bwd_tokens": 4, "bwd_heads": 4, "bwd_warps": 4}


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _pow2_divisor(n):
    return n & -n if n > 0 else 1


def _launch(pairs, freqs, inverse, copy_tail):
    """pairs: [(in, out)] for q (and k); every tensor [s, b, h, d] with unit last stride."""
    (qi, qo), (ki, ko) = pairs[0], pairs[-1]
    s, b, nq, d = qi.shape
    nk = ki.shape[2]
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
        qi, qo, ki, ko, freqs, s * b, b, nq, nk, half, rot, d, freqs.stride(0), sf_b,
        *qi.stride()[:3], *qo.stride()[:3], *ki.stride()[:3], *ko.stride()[:3],
        HAS_K=len(pairs) > 1, INVERSE=inverse, COPY_TAIL=copy_tail and rot < d, BLOCK_T=bt,
        BLOCK_H=bh, BLOCK_HALF=bhalf, BLOCK_TAIL=triton.next_power_of_2(max(d - rot, 1)),
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
