"""LayerNorm with weight and bias (the SigLIP ViT's norm: hidden 1152, eps 1e-6).

    y = (x - mean) * rstd * weight + bias,   rstd = 1 / sqrt(mean((x - mean)^2) + eps)

Statistics in fp32 (the variance from the centred row held in registers, not E[x^2] - mean^2),
output in x.dtype; weight and bias are read in their own dtype and applied in fp32. The forward
saves x (no copy), and per row the fp32 mean and rstd. The backward reads x and dy once and
writes dx; the weight and bias gradients are accumulated per program over many rows in fp32
registers and summed over programs in the same launch (fp32 atomic adds, the last program to
finish writes dW and dB), or under torch.use_deterministic_algorithms(True) written as [programs,
H] fp32 partials and summed in a fixed order by a second small kernel, as in rmsnorm.py, whose
helpers (row loads, the workspace, the partial sums, the launch-shape rules) this module shares.

A row lives in registers: H up to MAX_H. H need not be a power of two: a row is covered by one
padded power-of-two block, or (``*_split``) by two power-of-two parts (1152 = 1024 + 128), masked.
"""

import torch
import torch.nn.functional as F

from ._triton import tl, triton
from .dispatch import use_triton
from .rmsnorm import (
    _bwd_load,
    _bwd_programs,
    _bwd_stages,
    _col_parts,
    _dw_take,
    _dw_workspace,
    _reg_cap,
    _sum_rows,
    _warps,
)

MAX_H = 16384  # a row tile (x, dy, and the dW / dB accumulators) is held in registers


def layernorm_ref(x, weight, bias, eps=1e-6):
    """Pure-torch reference (and the fallback where Triton does not run): fp32 statistics and
    affine, output in x.dtype (the ViT's torch backend, models/vision.py's LayerNorm)."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype)


@triton.jit
def _ln_fwd_store(Y, W, B, xc, rstd, rows, cols, stride_y, M, H):
    # y of one column part, given the centred x (zero outside the row) and the row's rstd
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < H, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=(rows < M) & (cols < H))


@triton.jit
def _ln_fwd_load(X, R, S, rows, cols, stride_x, stride_r, stride_s, mask, HAS_RES: tl.constexpr):
    # x of one column part in fp32; with a residual, s = x + r added in fp32 and rounded once to the
    # I/O dtype (= torch's x + r), stored, and the norm sees that rounded s
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        sv = (x + tl.load(R + rows * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows * stride_s + cols, sv, mask=mask)
        x = sv.to(tl.float32)
    return x


@triton.jit
def _ln_fwd_kernel(X, R, S, Y, W, B, MEAN, RSTD, stride_x, stride_r, stride_s, stride_y, M, H, eps,
                   HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    # A [BLOCK_M, H] tile of rows per program, in column part A = [0, BLOCK_A) and, when
    # BLOCK_B > 0, part B = [BLOCK_A, BLOCK_A + BLOCK_B). HAS_RES: the row is s = x + r (stored to S).
    HAS_B: tl.constexpr = BLOCK_B > 0
    rows1 = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rows = rows1[:, None]
    ca = tl.arange(0, BLOCK_A)[None, :]
    cb = BLOCK_A + tl.arange(0, BLOCK_B if HAS_B else 1)[None, :]
    ma = (rows < M) & (ca < H)
    xa = _ln_fwd_load(X, R, S, rows, ca, stride_x, stride_r, stride_s, ma, HAS_RES)
    total = tl.sum(xa, axis=1)
    if HAS_B:
        mb = (rows < M) & (cb < H)
        xb = _ln_fwd_load(X, R, S, rows, cb, stride_x, stride_r, stride_s, mb, HAS_RES)
        total += tl.sum(xb, axis=1)
    mean = total / H
    # centred in registers; the padding lanes must stay 0 or they would count in the variance
    xca = tl.where(ma, xa - mean[:, None], 0.0)
    var = tl.sum(xca * xca, axis=1)
    if HAS_B:
        xcb = tl.where(mb, xb - mean[:, None], 0.0)
        var += tl.sum(xcb * xcb, axis=1)
    rstd = 1.0 / tl.sqrt(var / H + eps)
    _ln_fwd_store(Y, W, B, xca, rstd[:, None], rows, ca, stride_y, M, H)
    if HAS_B:
        _ln_fwd_store(Y, W, B, xcb, rstd[:, None], rows, cb, stride_y, M, H)
    tl.store(MEAN + rows1, mean, mask=rows1 < M)
    tl.store(RSTD + rows1, rstd, mask=rows1 < M)


@triton.jit
def _ln_bwd_dx(DX, g, xhat, rstd, c1, c2, ds, rows, cols, stride_dx, M, H, HAS_DS_OUT: tl.constexpr):
    # dx of one column part: rstd * (g - xhat * mean(g * xhat) - mean(g)), g = dy * w, plus the
    # gradient that reached the norm's input directly (the residual stream) with HAS_DS_OUT
    dx = rstd * (g - (xhat * c1 + c2))
    if HAS_DS_OUT:
        dx += ds.to(tl.float32)
    tl.store(DX + rows * stride_dx + cols, dx.to(DX.dtype.element_ty),
             mask=(rows < M) & (cols < H))


@triton.jit
def _ln_bwd_kernel(
    X, DY, DS_OUT, DX, W, MEAN, RSTD, PART, ACC, COUNTER, DW, DB, stride_x, stride_dy, stride_dso, stride_dx,
    M, H, HAS_DS_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    DW_ATOMIC: tl.constexpr, STAGES: tl.constexpr,
):
    # Program p walks the row tiles p, p + P, ... (grid-stride, P = programs) and keeps its share
    # of dW = sum dy * xhat and dB = sum dy in fp32 registers; the P rows of sums are combined in
    # this kernel (DW_ATOMIC: ACC holds [dW | dB], 2H fp32) or written as partials PART [2, P, H]
    # for _sum_rows_kernel. STAGES > 1: the loop goes to Triton's software pipeliner (later
    # tiles' loads in flight through shared memory), as in _rmsnorm_bwd_kernel. Padding lanes and
    # rows past M load x = dy = 0 (and mean = rstd = 0): they add nothing to any sum.
    HAS_B: tl.constexpr = BLOCK_B > 0
    pid = tl.program_id(0)
    ca = tl.arange(0, BLOCK_A)[None, :]
    cb = BLOCK_A + tl.arange(0, BLOCK_B if HAS_B else 1)[None, :]
    wa = tl.load(W + ca, mask=ca < H, other=0.0).to(tl.float32)
    wb = tl.load(W + cb, mask=(cb < H) & HAS_B, other=0.0).to(tl.float32)
    dwa = tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32)
    dba = tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32)
    dwb = tl.zeros([BLOCK_M, BLOCK_B if HAS_B else 1], dtype=tl.float32)
    dbb = tl.zeros([BLOCK_M, BLOCK_B if HAS_B else 1], dtype=tl.float32)
    for t in tl.range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
        rows = (t * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
        xa, dya, dsa = _bwd_load(X, DY, DS_OUT, rows, ca, stride_x, stride_dy, stride_dso, M, H, HAS_DS_OUT)
        xb, dyb, dsb = xa, dya, dsa
        if HAS_B:
            xb, dyb, dsb = _bwd_load(X, DY, DS_OUT, rows, cb, stride_x, stride_dy, stride_dso, M, H,
                                     HAS_DS_OUT)
        mean = tl.load(MEAN + rows, mask=rows < M, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
        dyfa = dya.to(tl.float32)
        xha = (xa.to(tl.float32) - mean) * rstd
        ga = dyfa * wa
        c1 = tl.sum(ga * xha, axis=1)
        c2 = tl.sum(ga, axis=1)
        if HAS_B:
            dyfb = dyb.to(tl.float32)
            xhb = (xb.to(tl.float32) - mean) * rstd
            gb = dyfb * wb
            c1 += tl.sum(gb * xhb, axis=1)
            c2 += tl.sum(gb, axis=1)
        c1 = c1[:, None] / H
        c2 = c2[:, None] / H
        _ln_bwd_dx(DX, ga, xha, rstd, c1, c2, dsa, rows, ca, stride_dx, M, H, HAS_DS_OUT)
        dwa += dyfa * xha
        dba += dyfa
        if HAS_B:
            _ln_bwd_dx(DX, gb, xhb, rstd, c1, c2, dsb, rows, cb, stride_dx, M, H, HAS_DS_OUT)
            dwb += dyfb * xhb
            dbb += dyfb
    dw_a = tl.sum(dwa, axis=0)[None, :]
    db_a = tl.sum(dba, axis=0)[None, :]
    if HAS_B:
        dw_b = tl.sum(dwb, axis=0)[None, :]
        db_b = tl.sum(dbb, axis=0)[None, :]
    if DW_ATOMIC:
        # As _rmsnorm_bwd_kernel: release-ordered adds into the zeroed workspace, an acq_rel
        # done-counter; the last program writes dW and dB and leaves workspace and counter zeroed.
        tl.atomic_add(ACC + ca, dw_a, mask=ca < H, sem="release")
        tl.atomic_add(ACC + H + ca, db_a, mask=ca < H, sem="release")
        if HAS_B:
            tl.atomic_add(ACC + cb, dw_b, mask=cb < H, sem="release")
            tl.atomic_add(ACC + H + cb, db_b, mask=cb < H, sem="release")
        tl.debug_barrier()
        done = tl.atomic_add(COUNTER, 1, sem="acq_rel")
        if done == tl.num_programs(0) - 1:
            tl.debug_barrier()
            _dw_take(ACC, DW, ca, H)
            _dw_take(ACC + H, DB, ca, H)
            if HAS_B:
                _dw_take(ACC, DW, cb, H)
                _dw_take(ACC + H, DB, cb, H)
            tl.atomic_xchg(COUNTER, 0)
    else:
        part_w = PART + pid.to(tl.int64) * H
        part_b = PART + (tl.num_programs(0) + pid).to(tl.int64) * H
        tl.store(part_w + ca, dw_a, mask=ca < H)
        tl.store(part_b + ca, db_a, mask=ca < H)
        if HAS_B:
            tl.store(part_w + cb, dw_b, mask=cb < H)
            tl.store(part_b + cb, db_b, mask=cb < H)


# Launch shape. Keys as rmsnorm.TUNE's (fwd_split: the forward's row in two power-of-two parts
# as well). Measured on an H200 at the ViT's shape, [22646, 1152] bf16 (`layernorm_bench --sweep`,
# bluelm_kernels/bench/results/layernorm_h200.{json,log}): the forward fastest as one masked 2048-wide
# block, 2 rows and 4 warps a program (0.034 ms; 0.054 with RMSNorm's H100 choice); the backward with
# 2-row tiles, 4 warps, 2 programs an SM, 4 stages (0.074 ms; 0.114 with 1-row tiles, 8 warps, 6 stages).
# bluelm_kernels/bench/layernorm_bench.py --tune KEY=VALUE times other choices.
TUNE = {"fwd_rows": 2, "fwd_warps": 4, "fwd_split": 0, "bwd_warps": 4,
        "bwd_rows": 2, "bwd_per_sm": 2, "bwd_stages": 4,
        "bwd_dw_atomic": 1, "bwd_even": 1, "bwd_split": 1, "bwd_maxnreg": 0,
        "bwd_programs_cpu": 4}


def _rows(t, h):
    """t as [rows, h] with unit column stride (a view where one exists, else a copy)."""
    t2 = t.reshape(-1, h)
    return t2 if t2.stride(-1) == 1 or h == 1 else t2.contiguous()


def _forward(x2, weight, bias, eps, r2=None):
    """(y, s, mean, rstd) of rows x2 [M, H] (with residual rows r2: s = x2 + r2, else s is x2)."""
    m, h = x2.shape
    y = torch.empty(m, h, device=x2.device, dtype=x2.dtype)
    s = torch.empty_like(y) if r2 is not None else x2
    mean = torch.empty(m, device=x2.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x2.device, dtype=torch.float32)
    bm = TUNE["fwd_rows"]
    block_a, block_b = _col_parts(h, TUNE["fwd_split"])
    r = x2 if r2 is None else r2
    _ln_fwd_kernel[(triton.cdiv(m, bm),)](
        x2, r, s, y, weight, bias, mean, rstd, x2.stride(0), r.stride(0), s.stride(0), y.stride(0), m, h, eps,
        HAS_RES=r2 is not None, BLOCK_M=bm, BLOCK_A=block_a, BLOCK_B=block_b,
        num_warps=_warps(h, "fwd_warps", TUNE),
    )
    return y, s, mean, rstd


def _backward(x2, dy2, weight, bias_dtype, mean, rstd, ds2=None):
    m, h = x2.shape
    dx = torch.empty(m, h, device=x2.device, dtype=x2.dtype)
    rows = TUNE["bwd_rows"]
    nprog = _bwd_programs(m, x2.device, rows, TUNE["bwd_per_sm"], TUNE)
    atomic = bool(TUNE["bwd_dw_atomic"]) and not torch.are_deterministic_algorithms_enabled()
    dw = torch.empty(h, device=x2.device, dtype=weight.dtype)
    db = torch.empty(h, device=x2.device, dtype=bias_dtype)
    if atomic:  # dW, dB summed in the kernel (the order of the fp32 adds varies run to run)
        # [dW | dB] accumulator: rmsnorm's workspace of 2H (each kernel hands it back zeroed, and
        # kernels on one stream run one after another, so sharing it with an RMSNorm is safe)
        acc, counter = _dw_workspace(x2.device, 2 * h)
        part = acc  # unused
    else:  # [2, programs, H] partials summed by a second kernel in a fixed order
        part = torch.empty(2, nprog, h, device=x2.device, dtype=torch.float32)
        acc = counter = part  # unused
    block_a, block_b = _col_parts(h, TUNE["bwd_split"])
    tile_bytes = rows * (block_a + block_b) * x2.element_size() * (2 if ds2 is None else 3)
    stages = _bwd_stages(x2.device, TUNE["bwd_stages"], TUNE["bwd_per_sm"], tile_bytes)
    dso = dy2 if ds2 is None else ds2
    _ln_bwd_kernel[(nprog,)](
        x2, dy2, dso, dx, weight, mean, rstd, part, acc, counter, dw, db, x2.stride(0), dy2.stride(0),
        dso.stride(0), dx.stride(0), m, h, HAS_DS_OUT=ds2 is not None, BLOCK_M=rows, BLOCK_A=block_a,
        BLOCK_B=block_b, DW_ATOMIC=atomic,
        STAGES=stages, num_warps=_warps(h, "bwd_warps", TUNE), **_reg_cap(x2.device, TUNE),
    )
    if not atomic:
        dw = _sum_rows(part[0], weight.dtype)
        db = _sum_rows(part[1], bias_dtype)
    return dx, dw, db


class _LayerNorm(torch.autograd.Function):
    """y = LayerNorm(s); s = x, or s = x + residual (also returned); with ``passthrough`` (no residual)
    x is returned as well. Either way the gradient reaching the second output is added to dx inside the
    backward's launch (the residual stream's gradient, no autograd accumulation pass)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual=None, passthrough=False):
        h = x.shape[-1]
        x2 = _rows(x, h)
        r2 = None if residual is None else _rows(residual, h)
        y, s, mean, rstd = _forward(x2, weight, bias, eps, r2)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.shape, ctx.bias_dtype, ctx.has_res = x.shape, bias.dtype, residual is not None
        if residual is not None:
            return y.view(x.shape), s.view(x.shape)
        return (y.view(x.shape), x.view_as(x)) if passthrough else y.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds_out=None):
        s2, weight, mean, rstd = ctx.saved_tensors
        h = s2.shape[1]
        ds2 = None if ds_out is None else _rows(ds_out, h)
        dx, dw, db = _backward(s2, _rows(dy, h), weight, ctx.bias_dtype, mean, rstd, ds2)
        need = ctx.needs_input_grad
        dx = dx.view(ctx.shape)
        return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None,
                dx if ctx.has_res and need[4] else None, None)


def _check(x, weight, bias):
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"layernorm: x must be a floating tensor of >= 1 dim, got {x.dtype} "
                         f"{tuple(x.shape)}")
    h = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None or p.shape != (h,) or not p.is_floating_point():
            got = None if p is None else f"{p.dtype} {tuple(p.shape)}"
            raise ValueError(f"layernorm: {name} must be a floating [{h}] tensor (x's last dim), "
                             f"got {got}")
        if p.device != x.device:
            raise ValueError(f"layernorm: {name} is on {p.device}, x on {x.device}")


def layernorm(x, weight, bias, eps=1e-6, residual=None):
    """LayerNorm over the last dim of x (any leading shape), output in x.dtype. With ``residual``:
    (LayerNorm(x + residual), x + residual), the add in the same pass and the gradient of the sum
    added inside the backward. Triton on CUDA (and on CPU under TRITON_INTERPRET=1), layernorm_ref
    elsewhere."""
    _check(x, weight, bias)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"layernorm: residual {residual.dtype} {tuple(residual.shape)} must match x's "
                         f"{x.dtype} {tuple(x.shape)}")
    if not use_triton(x) or x.numel() == 0:
        if residual is None:
            return layernorm_ref(x, weight, bias, eps)
        s = x + residual
        return layernorm_ref(s, weight, bias, eps), s
    _check_width(x)
    return _LayerNorm.apply(x, weight, bias, eps, residual, False)


def layernorm_passthrough(x, weight, bias, eps=1e-6):
    """(LayerNorm(x), x): x handed on through the norm (the residual stream), so that the gradient
    reaching it joins x's inside the norm's backward launch instead of an autograd add."""
    _check(x, weight, bias)
    if not use_triton(x) or x.numel() == 0:
        return layernorm_ref(x, weight, bias, eps), x
    _check_width(x)
    return _LayerNorm.apply(x, weight, bias, eps, None, True)


def _check_width(x):
    if x.shape[-1] > MAX_H:
        raise ValueError(f"layernorm: hidden size {x.shape[-1]} > {MAX_H} (MAX_H, "
                         "bluelm_kernels/layernorm.py): a row is held in registers")
