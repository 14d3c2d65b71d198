"""RMSNorm, optionally fused with the residual add that precedes it.

    y = s / sqrt(mean(s^2) + eps) * weight,   s = x (+ residual)

Statistics in fp32, outputs in x.dtype. With a residual the kernel also writes `s` (the new
residual stream), so the pre-norm block reads x and residual once instead of three passes
(add, then norm reading s twice). Backward reads s, dy (and the grad of s) once and writes ds;
the weight gradient is accumulated per program over many rows in fp32 registers, written as
one [programs, H] fp32 row each, and summed by a second small kernel (no atomics).
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
    X, R, S, Y, W, RSTD, stride_x, stride_r, stride_s, stride_y, M, H, eps,
    HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
):
    # A [BLOCK_M, H] tile of rows per program: more bytes in flight per program.
    rows1 = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rows = rows1[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < M) & (cols < H)
    xf = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        # Add in fp32, round once to the I/O dtype (= torch's x + r); the norm must see the
        # rounded `s` that we return.
        s = (xf + tl.load(R + rows * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        s = s.to(S.dtype.element_ty)
        tl.store(S + rows * stride_s + cols, s, mask=mask)
        xf = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / H + eps)
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
    y = xf * rstd[:, None] * w
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows1, rstd, mask=rows1 < M)


@triton.jit
def _rmsnorm_bwd_load(S, DY, DS_OUT, RSTD, rows, cols, stride_s, stride_dy, stride_dso, M, H,
                      HAS_DS_OUT: tl.constexpr):
    mask = (rows < M) & (cols < H)
    s = tl.load(S + rows * stride_s + cols, mask=mask, other=0.0)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0)
    if HAS_DS_OUT:
        ds = tl.load(DS_OUT + rows * stride_dso + cols, mask=mask, other=0.0)
    else:
        ds = dy
    rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
    return s, dy, ds, rstd


@triton.jit
def _rmsnorm_bwd_kernel(
    S, DY, DS_OUT, DX, W, RSTD, DW_PART, stride_s, stride_dy, stride_dso, stride_dx,
    M, H, HAS_DS_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    # Program p walks the row tiles p, p + P, p + 2P, ... (grid-stride, P = programs) and keeps
    # its share of dW in fp32 registers; one [P, H] fp32 row of partial sums per program is
    # reduced afterwards by _sum_rows_kernel (no atomics). With PREFETCH the next tile's loads
    # are issued before this tile's arithmetic and stores (software pipelining by hand), so
    # each program keeps two tiles of loads in flight.
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M
    cols = tl.arange(0, BLOCK)[None, :]
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    s, dy, ds, rstd = _rmsnorm_bwd_load(S, DY, DS_OUT, RSTD, rows, cols, stride_s, stride_dy,
                                        stride_dso, M, H, HAS_DS_OUT)
    for _ in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        if PREFETCH:
            s_n, dy_n, ds_n, rstd_n = _rmsnorm_bwd_load(S, DY, DS_OUT, RSTD, rows + step, cols,
                                                        stride_s, stride_dy, stride_dso, M, H,
                                                        HAS_DS_OUT)
        shat = s.to(tl.float32) * rstd
        dyf = dy.to(tl.float32)
        dyw = dyf * w
        dx = rstd * (dyw - shat * (tl.sum(dyw * shat, axis=1)[:, None] / H))
        if HAS_DS_OUT:  # gradient that reached `s` directly (the residual stream)
            dx += ds.to(tl.float32)
        tl.store(DX + rows * stride_dx + cols, dx.to(DX.dtype.element_ty),
                 mask=(rows < M) & (cols < H))
        dw += dyf * shat
        if PREFETCH:
            s, dy, ds, rstd = s_n, dy_n, ds_n, rstd_n
            rows += step
        else:
            rows += step
            s, dy, ds, rstd = _rmsnorm_bwd_load(S, DY, DS_OUT, RSTD, rows, cols, stride_s,
                                                stride_dy, stride_dso, M, H, HAS_DS_OUT)
    tl.store(DW_PART + pid.to(tl.int64) * H + cols, tl.sum(dw, axis=0)[None, :], mask=cols < H)


@triton.jit
def _sum_rows_kernel(P, OUT, N, H, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    # OUT[h] = sum_n P[n, h] (fp32 accumulation), cast to OUT's dtype: the dW partials -> dW.
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for r in range(0, N, BLOCK_N):
        rows = r + tl.arange(0, BLOCK_N)[:, None]
        acc += tl.load(P + rows * H + cols, mask=(rows < N) & (cols < H), other=0.0)
    out = tl.sum(acc, axis=0)[None, :]
    tl.store(OUT + cols, out.to(OUT.dtype.element_ty), mask=cols < H)


# Launch shape, chosen by kernels/bench (see docs/KERNELS.md); keys: rows per tile (backward:
# without / with residual), warps, backward programs per SM, backward prefetch of the next tile.
# Measured on one H100 (docs/KERNELS.md, kernels/bench/results/h100_gputime_run1_*): the
# plain backward is fastest with 1-row tiles (0.055 ms vs 0.060 with 2), the residual backward
# (one more input) with 2-row tiles (0.070 ms vs 0.080).
TUNE = {"fwd_rows": 2, "fwd_warps": 8, "bwd_rows": 1, "bwd_res_rows": 2, "bwd_warps": 8,
        "bwd_per_sm": 2, "bwd_prefetch": 1, "bwd_programs_cpu": 4}


def _block(h):
    return triton.next_power_of_2(h)


def _warps(h, key):
    return max(1, min(TUNE[key], _block(h) // 128))


def _bwd_programs(m, device, rows):
    tiles = triton.cdiv(m, rows)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(tiles, TUNE["bwd_per_sm"] * sms))
    return max(1, min(tiles, TUNE["bwd_programs_cpu"]))  # interpreter: few programs


def _sum_rows(part, dtype):
    n, h = part.shape
    out = torch.empty(h, device=part.device, dtype=dtype)
    # Narrow column blocks (16 fp32 = 64 B a row) and tall row blocks: ~160 programs at
    # H = 2560, each with <= 4 dependent load steps for <= 1056 partial rows.
    bh = min(16, triton.next_power_of_2(h))
    bn = min(256, triton.next_power_of_2(n))
    _sum_rows_kernel[(triton.cdiv(h, bh),)](part, out, n, h, BLOCK_N=bn, BLOCK_H=bh,
                                            num_warps=4)
    return out


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
        bm = TUNE["fwd_rows"]
        _rmsnorm_fwd_kernel[(triton.cdiv(m, bm),)](
            x2, r2, s, y, weight, rstd, x2.stride(0), r2.stride(0), s.stride(0), y.stride(0),
            m, h, eps, HAS_RES=residual is not None, BLOCK_M=bm, BLOCK=_block(h),
            num_warps=_warps(h, "fwd_warps"),
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
        rows = TUNE["bwd_res_rows" if ds_out is not None else "bwd_rows"]
        nprog = _bwd_programs(m, s.device, rows)
        dw_part = torch.empty(nprog, h, device=s.device, dtype=torch.float32)
        _rmsnorm_bwd_kernel[(nprog,)](
            s, dy2, dso, dx, weight, rstd, dw_part, s.stride(0), dy2.stride(0), dso.stride(0),
            dx.stride(0), m, h, HAS_DS_OUT=ds_out is not None, BLOCK_M=rows,
            BLOCK=_block(h), PREFETCH=bool(TUNE["bwd_prefetch"]),
            num_warps=_warps(h, "bwd_warps"),
        )
        dw = _sum_rows(dw_part, weight.dtype)
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
