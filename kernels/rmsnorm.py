"""RMSNorm, optionally fused with the residual add that precedes it.

    y = s / sqrt(mean(s^2) + eps) * weight,   s = x (+ residual)

Statistics in fp32, outputs in x.dtype. With a residual the kernel also writes `s` (the new
residual stream), so the pre-norm block reads x and residual once instead of three passes
(add, then norm reading s twice). Backward reads s, dy (and the grad of s) once and writes ds;
the weight gradient is reduced per program in fp32 and summed on the host.
"""

import torch

from ._triton import tl, triton
from .dispatch import use_triton


def rmsnorm_ref(x, weight, eps=1e-5, residual=None):
    """Pure-torch reference (and the CPU fallback)."""
    s = x if residual is None else x + residual
    sf = s.float()
    y = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    y = (y * weight.float()).to(x.dtype)
    return y if residual is None else (y, s)


@triton.jit
def _rmsnorm_fwd_kernel(
    X, R, S, Y, W, RSTD, stride_x, stride_r, stride_s, stride_y, H, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        # Round the sum to the I/O dtype first: the norm must see the `s` we return.
        x = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(S + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xf * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(
    S, DY, DS_OUT, DX, W, RSTD, DW_PART, stride_s, stride_dy, stride_dso, stride_dx,
    M, H, HAS_DS_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    # Each program walks rows pid, pid+P, ... and keeps its share of dW in registers.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, M, nprog):
        row = tl.cast(row, tl.int64)
        s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        shat = s * rstd
        dyw = dy * w
        dx = rstd * (dyw - shat * (tl.sum(dyw * shat, axis=0) / H))
        if HAS_DS_OUT:  # gradient that reached `s` directly (the residual stream)
            dx += tl.load(DS_OUT + row * stride_dso + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * shat
    tl.store(DW_PART + pid.to(tl.int64) * H + cols, dw, mask=mask)


def _launch_cfg(h):
    block = triton.next_power_of_2(h)
    return block, min(16, max(1, block // 256))


def _bwd_programs(m, device):
    if device.type == "cuda":
        return min(m, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(m, 4)  # interpreter: few programs, each loops over rows


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        shape, h = x.shape, x.shape[-1]
        x2 = x.reshape(-1, h).contiguous()
        r2 = residual.reshape(-1, h).contiguous() if residual is not None else x2
        m = x2.shape[0]
        y = torch.empty_like(x2)
        s = torch.empty_like(x2) if residual is not None else x2
        rstd = torch.empty(m, device=x.device, dtype=torch.float32)
        block, warps = _launch_cfg(h)
        _rmsnorm_fwd_kernel[(m,)](
            x2, r2, s, y, weight, rstd, x2.stride(0), r2.stride(0), s.stride(0), y.stride(0),
            h, eps, HAS_RES=residual is not None, BLOCK=block, num_warps=warps,
        )
        ctx.save_for_backward(s, weight, rstd)
        ctx.has_res, ctx.shape = residual is not None, shape
        if residual is None:
            return y.view(shape)
        return y.view(shape), s.view(shape)

    @staticmethod
    def backward(ctx, dy, ds_out=None):
        s, weight, rstd = ctx.saved_tensors
        m, h = s.shape
        dy2 = dy.reshape(-1, h).contiguous()
        dso = ds_out.reshape(-1, h).contiguous() if ds_out is not None else dy2
        dx = torch.empty_like(s)
        nprog = _bwd_programs(m, s.device)
        dw_part = torch.empty(nprog, h, device=s.device, dtype=torch.float32)
        block, warps = _launch_cfg(h)
        _rmsnorm_bwd_kernel[(nprog,)](
            s, dy2, dso, dx, weight, rstd, dw_part, s.stride(0), dy2.stride(0), dso.stride(0),
            dx.stride(0), m, h, HAS_DS_OUT=ds_out is not None, BLOCK=block, num_warps=warps,
        )
        dw = dw_part.sum(0).to(weight.dtype)
        dx = dx.view(ctx.shape)
        # x and residual get the same gradient (s = x + residual); autograd copies on accumulate.
        return dx, dw, (dx if ctx.has_res else None), None


def rmsnorm(x, weight, eps=1e-5, residual=None):
    """RMSNorm over the last dim. Returns `y`, or `(y, x + residual)` when `residual` is given."""
    if not use_triton(x):
        return rmsnorm_ref(x, weight, eps, residual)
    return _RMSNorm.apply(x, weight, residual, eps)


class FusedRMSNorm(torch.nn.Module):
    """megatron-core norm-module convention: `(config, hidden_size, eps)`; weight initialized to 1."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        dtype = getattr(config, "params_dtype", None)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        # Tells megatron's grad all-reduce that this replicated weight sees sequence-parallel inputs.
        self.weight.sequence_parallel = getattr(config, "sequence_parallel", False)

    def forward(self, x, residual=None):
        return rmsnorm(x, self.weight, self.eps, residual)
