"""Bias gradients: the column sums of a linear's output gradient ``dy [rows, N]``, in fp32.

    db = sum over rows of dy          (returned in the bias's dtype, or added to its fp32 main_grad)

PyTorch's ``dy.sum(0)`` over the ViT's [21632, 1152..4304] bf16 gradients took 5.4 ms of each
micro-batch of the multimodal model on an H200 (the 108 bias gradients of its 27 layers, about half the
copy bandwidth in the step's profile), and DDP's hook then added each to ``main_grad`` in a launch of
its own. Here: a first launch where each program sums a contiguous range of rows over a
BLOCK_N-column strip into fp32 registers and writes one row of partials [programs, N], then a
second, small launch that sums the partials of each column in a fixed order and either stores the
result in the bias's dtype or adds it to an fp32 accumulator (DDP's ``main_grad``). Fixed partition,
fixed order: bit-identical run to run. The fp32 sum is rounded once (or never, into ``main_grad``),
as PyTorch's reduction rounds once.

``gelu_tanh_backward_bias``: the ViT's fc1 output feeds GELU(tanh), so the gradient its bias needs is
the GELU backward's output; that kernel writes it and sums its columns in the same pass (no re-read of the
[rows, 4304] gradient for the bias).
"""

import torch

from ._triton import tl, triton
from .dispatch import use_triton


def column_sum_ref(dy2, dtype=None):
    """fp32 column sums of dy2 [rows, N], in ``dtype`` (default dy2's)."""
    return dy2.float().sum(0).to(dtype or dy2.dtype)


@triton.jit
def _colsum_part_kernel(DY, X, DX, PART, M, N, stride_dy, stride_x, stride_dx, ROWS, GELU: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # program (p, c): rows [p * ROWS, (p + 1) * ROWS) of column strip c summed in fp32 into PART[p]: of dy,
    # or (GELU) of dx = dy * gelu_tanh'(x), written to DX, the sums taken of dx as rounded (what the
    # linear's GEMMs read)
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    start = p * ROWS
    end = tl.minimum(start + ROWS, M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r in range(start, end, BLOCK_M):
        rows = (r + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
        mask = (rows < end) & cmask[None, :]
        g = tl.load(DY + rows * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if GELU:
            # torch's approximate="tanh": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            x = tl.load(X + rows * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x_sq = x * x
            t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x_sq * x)) - 1.0  # tanh
            dx = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x_sq))
            dx = dx.to(DX.dtype.element_ty)
            tl.store(DX + rows * stride_dx + cols[None, :], dx, mask=mask)
            g = dx.to(tl.float32)
        acc += g
    tl.store(PART + p.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _colsum_final_kernel(PART, OUT, P, N, ACCUMULATE: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    # the P partial rows of a column strip, summed in order; stored (OUT's dtype) or added to OUT
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        acc += tl.load(PART + rows[:, None] * N + cols[None, :], mask=(rows[:, None] < P) & cmask[None, :],
                       other=0.0)
    total = tl.sum(acc, axis=0)
    if ACCUMULATE:
        total += tl.load(OUT + cols, mask=cmask, other=0.0)
    tl.store(OUT + cols, total.to(OUT.dtype.element_ty), mask=cmask)


def gelu_tanh_backward_ref(dg, x):
    """torch's gradient of ``F.gelu(x, approximate="tanh")``."""
    return torch.ops.aten.gelu_backward(dg, x, approximate="tanh")


def gelu_tanh_backward_bias(dg, x, bias_dtype, acc=None):
    """The gradient of ``F.gelu(x, approximate="tanh")`` (x: the linear's output with its bias) and that
    linear's bias gradient from the same pass: (dx, db) with db the fp32 column sums of dx in
    ``bias_dtype``, or (dx, None) after adding them to the fp32 ``acc`` (``main_grad``)."""
    if dg.shape != x.shape:
        raise ValueError(f"gelu_tanh_backward_bias: gradient {tuple(dg.shape)} and input {tuple(x.shape)} differ")
    dg2, x2 = _rows2d(dg), _rows2d(x)
    m, n = x2.shape
    if acc is not None and (acc.dtype != torch.float32 or acc.shape != (n,) or not acc.is_contiguous()):
        raise ValueError(f"gelu_tanh_backward_bias: acc must be a contiguous fp32 [{n}] tensor, got "
                         f"{acc.dtype} {tuple(acc.shape)}")
    if not use_triton(x2) or x2.numel() == 0:
        dx = gelu_tanh_backward_ref(dg2, x2)
        if acc is not None:
            acc.add_(dx.float().sum(0))
            return dx.view(x.shape), None
        return dx.view(x.shape), column_sum_ref(dx, bias_dtype)
    dx = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    part = _column_parts(dg2, GELU_TUNE, x2, dx)
    out = acc if acc is not None else torch.empty(n, device=x2.device, dtype=bias_dtype)
    _sum_parts(part, out, accumulate=acc is not None)
    return dx.view(x.shape), (None if acc is not None else out)


# Launch shape: rows and columns of a tile, warps, and programs aimed at per SM (the row ranges are
# sized so that the grid is about that many programs a streaming multiprocessor). The fastest of 54 on an
# H200 summed over the ViT's four widths (`python -m bluelm_kernels.bench.vit_grad_passes_bench --sweep`,
# bluelm_kernels/bench/results/vit_grad_passes_sweep_h200.{json,log}): 0.144 ms a layer into main_grad
# against 0.201 for PyTorch's sum(0) + add_ (fc1 [21632, 4304]: 82% of the copy bandwidth).
TUNE = {"rows": 32, "cols": 128, "warps": 8, "per_sm": 4, "final_rows": 16, "final_cols": 128}
# gelu_tanh_backward_bias's own (two streams in, one out): the fastest of 54 on an H200 at fc1's
# [21632, 4304] bf16, 0.183 ms (72% of the copy bandwidth) against 0.206 for torch's gelu_backward +
# sum(0) + add_ and 0.238 at TUNE's shape (`vit_grad_passes_bench --only-gelu --sweep`,
# bluelm_kernels/bench/results/vit_gelu_backward_bias_sweep_h200.{json,log})
GELU_TUNE = {"rows": 16, "cols": 128, "warps": 4, "per_sm": 8}


_SMS: dict = {}  # device -> streaming multiprocessors (asked once; the CPU interpreter: 4)


def _programs(m, n, device, tune=TUNE):
    """(row programs, rows a program) for [m, n] under a launch shape (``TUNE`` or ``GELU_TUNE``)."""
    sms = _SMS.get(device)
    if sms is None:
        cuda = device.type == "cuda"
        sms = _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4
    bm, bn = tune["rows"], tune["cols"]
    strips = triton.cdiv(n, bn)
    p = max(1, min(triton.cdiv(m, bm), triton.cdiv(tune["per_sm"] * sms, strips)))
    rows = triton.cdiv(triton.cdiv(m, p), bm) * bm
    return triton.cdiv(m, rows), rows


def _column_parts(dy2, tune, x2=None, dx=None):
    """The [programs, N] fp32 partial column sums of dy2 [M, N] (with x2: of dx = dy2 * gelu_tanh'(x2),
    written to dx) under the launch shape ``tune``."""
    m, n = dy2.shape
    p, rows = _programs(m, n, dy2.device, tune)
    part = torch.empty(p, n, device=dy2.device, dtype=torch.float32)
    gelu = x2 is not None
    x2, dx = (x2, dx) if gelu else (dy2, dy2)  # unread without GELU
    _colsum_part_kernel[(p, triton.cdiv(n, tune["cols"]))](
        dy2, x2, dx, part, m, n, dy2.stride(0), x2.stride(0), dx.stride(0), rows, GELU=gelu,
        BLOCK_M=tune["rows"], BLOCK_N=tune["cols"], num_warps=tune["warps"])
    return part


def _launch(dy2, out, accumulate):
    _sum_parts(_column_parts(dy2, TUNE), out, accumulate)


def _sum_parts(part, out, accumulate):
    """out (= or +=) the column sums of the partials part [P, N], in a fixed order."""
    p, n = part.shape
    fn = TUNE["final_cols"]
    _colsum_final_kernel[(triton.cdiv(n, fn),)](part, out, p, n, ACCUMULATE=accumulate,
                                                BLOCK_P=TUNE["final_rows"], BLOCK_N=fn, num_warps=4)


def _rows2d(dy):
    dy2 = dy.reshape(-1, dy.shape[-1])
    return dy2 if dy2.stride(-1) == 1 else dy2.contiguous()


def column_sum(dy, dtype=None):
    """Sum of dy [..., N] over every leading dim, fp32-accumulated, in ``dtype`` (default dy's)."""
    dy2 = _rows2d(dy)
    dtype = dtype or dy.dtype
    if not use_triton(dy2) or dy2.numel() == 0:
        return column_sum_ref(dy2, dtype)
    out = torch.empty(dy2.shape[1], device=dy2.device, dtype=dtype)
    _launch(dy2, out, accumulate=False)
    return out


def column_sum_into_(acc, dy):
    """acc [N] (fp32) += the column sums of dy [..., N], summed in fp32: the bias gradient into DDP's
    ``main_grad`` without a bf16 gradient in between."""
    dy2 = _rows2d(dy)
    if acc.dtype != torch.float32 or acc.shape != (dy2.shape[1],) or not acc.is_contiguous():
        raise ValueError(f"column_sum_into_: acc must be a contiguous fp32 [{dy2.shape[1]}] tensor, got "
                         f"{acc.dtype} {tuple(acc.shape)}")
    if not use_triton(dy2) or dy2.numel() == 0:
        acc.add_(dy2.float().sum(0))
        return acc
    _launch(dy2, acc, accumulate=True)
    return acc
