"""megatron-core's split of the fused QKV projection (no RoPE: the ViT's attention), with a backward that
writes dq, dk and dv into one d(mixed_qkv) in a single launch.

``mixed_qkv [s, b, groups, (hpg + 2) * d]`` holds, per query group, its hpg query heads, then one key
and one value head (``SelfAttention.get_query_key_value_tensors``). The forward is megatron's split:
q, k, v are views of it (q a copy where hpg > 1, as megatron's reshape makes one). Autograd's backward of
that split concatenates the three gradients (``SplitWithSizesBackward``: a ``cat`` that, on the layout
cuDNN's attention backward returns them in, [b, heads, s, d], runs at ~45% of the copy bandwidth on an
H200: 4.3 ms a micro-batch of the multimodal model's ViT). Here one kernel copies them into their slots,
reading each gradient along its own contiguous dimension.
"""

import torch

from ._triton import tl, triton
from .dispatch import use_triton


def _check(mixed_qkv, heads_per_group):
    if mixed_qkv.dim() != 4 or heads_per_group < 1 or mixed_qkv.shape[-1] % (heads_per_group + 2):
        raise ValueError(f"split_qkv: mixed_qkv {tuple(mixed_qkv.shape)} is not [s, b, groups, "
                         f"(heads per group {heads_per_group} + 2) x head dim]")


def split_qkv_ref(mixed_qkv, heads_per_group):
    """megatron-core's split: (q [s, b, groups * hpg, d], k [s, b, groups, d], v [s, b, groups, d])."""
    _check(mixed_qkv, heads_per_group)
    s, b, g, w = mixed_qkv.shape
    d = w // (heads_per_group + 2)
    q, k, v = torch.split(mixed_qkv, [heads_per_group * d, d, d], dim=3)
    return q.reshape(s, b, g * heads_per_group, d), k, v


@triton.jit
def _cat_heads_kernel(
    DQ, DK, DV, OUT, T, S, B, NQ, NK, D, HPG,
    sqs, sqb, sqh, sks, skb, skh, svs, svb, svh, sos, sob, sog,
    B_MAJOR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # BLOCK_T tokens a program, every head of dq, dk, dv. B_MAJOR: tokens in (b, s) order, for inputs
    # whose positions are adjacent in memory (cuDNN's [b, heads, s, d]); else (s, b), megatron's order.
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]
    tmask = tok < T
    if B_MAJOR:
        b = (tok // S).to(tl.int64)
        s = (tok % S).to(tl.int64)
    else:
        s = (tok // B).to(tl.int64)
        b = (tok % B).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, None, :]
    out0 = OUT + s * sos + b * sob
    for h0 in range(0, NQ, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[None, :, None]
        m = tmask & (h < NQ) & (d < D)
        x = tl.load(DQ + s * sqs + b * sqb + h * sqh + d, mask=m, other=0.0)
        tl.store(out0 + (h // HPG) * sog + (h % HPG) * D + d, x, mask=m)
    for h0 in range(0, NK, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[None, :, None]
        m = tmask & (h < NK) & (d < D)
        xk = tl.load(DK + s * sks + b * skb + h * skh + d, mask=m, other=0.0)
        tl.store(out0 + h * sog + HPG * D + d, xk, mask=m)
        xv = tl.load(DV + s * svs + b * svb + h * svh + d, mask=m, other=0.0)
        tl.store(out0 + h * sog + (HPG + 1) * D + d, xv, mask=m)


# Launch shape: tokens a program, heads an inner step, warps. The fastest of 45 on an H200 at the ViT's
# shape (`python -m bluelm_kernels.bench.vit_grad_passes_bench --sweep`,
# bluelm_kernels/bench/results/vit_grad_passes_sweep_h200.{json,log}): 0.137 ms against torch.cat's 0.281.
TUNE = {"tokens": 8, "heads": 4, "warps": 4}


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def cat_heads(dq, dk, dv, heads_per_group):
    """dq [s, b, groups * hpg, d], dk / dv [s, b, groups, d] (any strides) -> the contiguous
    [s, b, groups, (hpg + 2) * d] tensor that megatron's split would have taken them from."""
    dq, dk, dv = _unit_last(dq), _unit_last(dk), _unit_last(dv)
    s, b, g, d = dk.shape
    out = torch.empty(s, b, g, (heads_per_group + 2) * d, device=dk.device, dtype=dk.dtype)
    if out.numel() == 0:
        return out
    nq = dq.shape[2]
    bh = min(TUNE["heads"], nq & -nq, g & -g)
    bt = TUNE["tokens"]
    # positions adjacent in memory: walk them in order (reads contiguous along s); megatron's layout: (s, b)
    b_major = b > 1 and dq.stride(0) < dq.stride(1)
    _cat_heads_kernel[(triton.cdiv(s * b, bt),)](
        dq, dk, dv, out, s * b, s, b, nq, g, d, heads_per_group,
        *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], *out.stride()[:3],
        B_MAJOR=b_major, BLOCK_T=bt, BLOCK_H=bh, BLOCK_D=triton.next_power_of_2(d), num_warps=TUNE["warps"],
    )
    return out


class _SplitQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mixed_qkv, heads_per_group):
        ctx.heads_per_group = heads_per_group
        return split_qkv_ref(mixed_qkv, heads_per_group)

    @staticmethod
    def backward(ctx, dq, dk, dv):  # an unused output's gradient arrives as zeros (materialized)
        return cat_heads(dq, dk, dv, ctx.heads_per_group), None


def split_qkv(mixed_qkv, heads_per_group):
    """megatron-core's QKV split (``split_qkv_ref``); on Triton, its backward is one launch that writes
    the three gradients into their slots of d(mixed_qkv) (no concatenation pass)."""
    _check(mixed_qkv, heads_per_group)
    if not use_triton(mixed_qkv) or not mixed_qkv.requires_grad:
        return split_qkv_ref(mixed_qkv, heads_per_group)
    return _SplitQKV.apply(mixed_qkv, heads_per_group)
