"""SwiGLU on megatron's fused gate/up layout: x[..., 2F] = [gate, up]  ->  silu(gate) * up.

Forward reads 2F and writes F per row; backward recomputes silu from x (nothing saved but x),
reads x and dy once and writes d[gate, up] once, in one pass. Math in fp32, I/O in x.dtype.
"""

import torch
import torch.nn.functional as F

from ._triton import tl, triton
from .dispatch import use_triton


def swiglu_ref(x):
    """Pure-torch reference (and the CPU fallback)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _tile(NCB, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    # 1-D grid, row-major over [row tiles, column blocks]: consecutive programs sweep a row
    # (contiguous addresses) and the row count has no grid-dimension limit.
    pid = tl.program_id(0)
    rows = ((pid // NCB) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = ((pid % NCB) * BLOCK + tl.arange(0, BLOCK))[None, :]
    return rows, cols


@triton.jit
def _swiglu_fwd_kernel(X, Y, M, F_, NCB, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
                       PARTS: tl.constexpr = 1, STRIDE_PART=0, ROUND: tl.constexpr = False):
    rows, cols = _tile(NCB, BLOCK_M, BLOCK)
    mask = (rows < M) & (cols < F_)
    g = tl.load(X + rows * 2 * F_ + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + rows * 2 * F_ + F_ + cols, mask=mask, other=0.0).to(tl.float32)
    if ROUND:
        # X holds the fp32 split-K partials of fc1 ([PARTS, M, 2F]): sum, then round once to the
        # activation dtype (the unsplit matmul's output)
        for p in tl.static_range(1, PARTS):
            g += tl.load(X + p * STRIDE_PART + rows * 2 * F_ + cols, mask=mask, other=0.0)
            u += tl.load(X + p * STRIDE_PART + rows * 2 * F_ + F_ + cols, mask=mask, other=0.0)
        g = g.to(Y.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        u = u.to(Y.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Y + rows * F_ + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(X, DY, DX, M, F_, NCB, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    rows, cols = _tile(NCB, BLOCK_M, BLOCK)
    mask = (rows < M) & (cols < F_)
    g = tl.load(X + rows * 2 * F_ + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + rows * 2 * F_ + F_ + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows * F_ + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))  # d silu/dg = sig * (1 + g * (1 - sig))
    tl.store(DX + rows * 2 * F_ + cols, dg.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + rows * 2 * F_ + F_ + cols, (dy * silu).to(DX.dtype.element_ty), mask=mask)


# Launch shape, chosen by bluelm_kernels/bench (see docs/KERNELS.md): columns and rows per program and
# warps (block * rows / (32 * warps) elements per thread; 8 bf16 = one 16-byte access).
TUNE = {"block": 2048, "rows": 1, "warps": 8, "bwd_block": 1024, "bwd_rows": 2, "bwd_warps": 8}


def _launch(kernel, m, f, pre, *tensors, **extra):
    if m == 0:
        return
    block = min(TUNE[pre + "block"], triton.next_power_of_2(f))
    rows = TUNE[pre + "rows"]
    ncb = triton.cdiv(f, block)
    warps = max(1, min(TUNE[pre + "warps"], block * rows // 256))
    kernel[(triton.cdiv(m, rows) * ncb,)](*tensors, m, f, ncb, BLOCK_M=rows, BLOCK=block,
                                          num_warps=warps, **extra)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        f = x.shape[-1] // 2
        x2 = x.reshape(-1, 2 * f).contiguous()
        y = torch.empty(x2.shape[0], f, device=x.device, dtype=x.dtype)
        _launch(_swiglu_fwd_kernel, x2.shape[0], f, "", x2, y)
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], f)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        f = x2.shape[1] // 2
        dy2 = dy.reshape(-1, f).contiguous()
        dx = torch.empty_like(x2)
        _launch(_swiglu_bwd_kernel, x2.shape[0], f, "bwd_", x2, dy2, dx)
        return dx.view(ctx.shape)


def swiglu(x):
    """silu(gate) * up for x = [gate, up] along the last dim (even size)."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim, got {x.shape[-1]}")
    if not use_triton(x):
        return swiglu_ref(x)
    return _SwiGLU.apply(x)


def swiglu_partials(parts, dtype):
    """Forward-only SwiGLU of fc1 given as its fp32 split-K partials ``parts`` [P, M, 2F]
    (``split_k.partials``): ``swiglu(parts.sum(0).to(dtype))``, the sum inside this kernel."""
    if parts.dim() != 3 or parts.dtype != torch.float32 or parts.shape[-1] % 2:
        raise ValueError(f"swiglu_partials: expected fp32 partials [P, M, 2F], got {parts.dtype} "
                         f"{tuple(parts.shape)}")
    if not use_triton(parts):
        return swiglu_ref(parts.sum(0).to(dtype))
    p, m, f2 = parts.shape
    parts = parts.contiguous()
    y = torch.empty(m, f2 // 2, device=parts.device, dtype=dtype)
    _launch(_swiglu_fwd_kernel, m, f2 // 2, "", parts, y, PARTS=p, STRIDE_PART=parts.stride(0), ROUND=True)
    return y
