"""RMSNorm, optionally fused with the residual add that precedes it.

    y = s / sqrt(mean(s^2) + eps) * weight,   s = x (+ residual)

Statistics in fp32, outputs in x.dtype. With a residual the kernel also writes `s` (the new
residual stream), so the pre-norm block reads x and residual once instead of three passes
(add, then norm reading s twice). Backward reads s, dy (and the grad of s) once and writes ds;
the weight gradient is accumulated per program over many rows in fp32 registers, then summed
over programs in the same launch (fp32 atomic adds; the last program to finish writes dW), or,
under torch.use_deterministic_algorithms(True), written as one [programs, H] fp32 row each and
summed in a fixed order by a second small kernel.
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
    PARTS: tl.constexpr = 1, stride_part=0, ROUND: tl.constexpr = False,
):
    # A [BLOCK_M, H] tile of rows per program: more bytes in flight per program.
    rows1 = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rows = rows1[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < M) & (cols < H)
    xf = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ROUND:
        # x is the fp32 split-K partials of a matmul ([PARTS, M, H]): their sum, rounded to the
        # activation dtype once, is the matmul's output (what an unsplit GEMM would have written)
        for p in tl.static_range(1, PARTS):
            xf += tl.load(X + p * stride_part + rows * stride_x + cols, mask=mask, other=0.0)
        xf = xf.to(Y.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
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
def _bwd_load(S, DY, DS_OUT, rows, cols, stride_s, stride_dy, stride_dso, M, H,
              HAS_DS_OUT: tl.constexpr):
    # s, dy (and the gradient that reached s directly) of one column part of a row tile
    mask = (rows < M) & (cols < H)
    s = tl.load(S + rows * stride_s + cols, mask=mask, other=0.0)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0)
    if HAS_DS_OUT:
        ds = tl.load(DS_OUT + rows * stride_dso + cols, mask=mask, other=0.0)
    else:
        ds = dy
    return s, dy, ds


@triton.jit
def _bwd_part(DX, s, dy, ds, w, rstd, c, rows, cols, stride_dx, M, H, HAS_DS_OUT: tl.constexpr):
    # dx of one column part, given c = rstd * sum(dy * w * s) / H over the whole row; returns
    # this part's dW contribution dy * s * rstd.
    shat = s.to(tl.float32) * rstd
    dyf = dy.to(tl.float32)
    dx = rstd * (dyf * w - shat * c)
    if HAS_DS_OUT:  # gradient that reached `s` directly (the residual stream)
        dx += ds.to(tl.float32)
    tl.store(DX + rows * stride_dx + cols, dx.to(DX.dtype.element_ty),
             mask=(rows < M) & (cols < H))
    return dyf * shat


@triton.jit
def _dw_take(DW_ACC, DW, cols, H):
    # dW = the summed workspace (an atomic add of 0 reads the value in L2, not a stale L1 line);
    # the workspace is zeroed again for the next call (every other program is done with it)
    zero = tl.zeros([1, cols.shape[1]], dtype=tl.float32)
    total = tl.atomic_add(DW_ACC + cols, zero, mask=cols < H, sem="acquire")
    tl.store(DW + cols, total.to(DW.dtype.element_ty), mask=cols < H)
    tl.store(DW_ACC + cols, zero, mask=cols < H)


@triton.jit
def _bwd_tile(S, DY, DS_OUT, RSTD, rows, ca, cb, stride_s, stride_dy, stride_dso, M, H,
              HAS_DS_OUT: tl.constexpr, HAS_B: tl.constexpr):
    # every load of one row tile: both column parts and rstd (part B = part A when absent)
    sa, dya, dsa = _bwd_load(S, DY, DS_OUT, rows, ca, stride_s, stride_dy, stride_dso, M, H,
                             HAS_DS_OUT)
    sb, dyb, dsb = sa, dya, dsa
    if HAS_B:
        sb, dyb, dsb = _bwd_load(S, DY, DS_OUT, rows, cb, stride_s, stride_dy, stride_dso, M, H,
                                 HAS_DS_OUT)
    rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
    return sa, dya, dsa, sb, dyb, dsb, rstd


@triton.jit
def _rmsnorm_bwd_kernel(
    S, DY, DS_OUT, DX, W, RSTD, DW_PART, DW_ACC, COUNTER, DW, stride_s, stride_dy, stride_dso,
    stride_dx, M, H, HAS_DS_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr, DW_ATOMIC: tl.constexpr, STAGES: tl.constexpr,
):
    # Program p walks the row tiles p, p + P, p + 2P, ... (grid-stride, P = programs) and keeps
    # its share of dW in fp32 registers; the P rows of dW sums are then combined in this kernel
    # (DW_ATOMIC) or written as [P, H] partials for _sum_rows_kernel (fixed order).
    # STAGES > 1 hands the loop to Triton's software pipeliner: the loads of the next
    # STAGES - 1 tiles are issued as asynchronous copies (cp.async) into shared memory while this
    # tile is computed, so the bytes in flight cost shared memory, not registers (an H100 keeps
    # its copy engine busy with ~50-60 KB in flight per SM: 1 program x 6 stages of a 10 KB
    # tile, bluelm_kernels/bench/results/h100_rmsnorm_pipelined_bwd_*).
    # A row is covered by column part A = [0, BLOCK_A) and, when BLOCK_B > 0, part B =
    # [BLOCK_A, BLOCK_A + BLOCK_B): two powers of two (H = 2560: 2048 + 512) instead of one
    # next_power_of_2(H) block (4096), so no lanes and registers go to padding.
    HAS_B: tl.constexpr = BLOCK_B > 0
    pid = tl.program_id(0)
    ca = tl.arange(0, BLOCK_A)[None, :]
    cb = BLOCK_A + tl.arange(0, BLOCK_B if HAS_B else 1)[None, :]
    wa = tl.load(W + ca, mask=ca < H, other=0.0).to(tl.float32)
    wb = tl.load(W + cb, mask=(cb < H) & HAS_B, other=0.0).to(tl.float32)
    dwa = tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32)
    dwb = tl.zeros([BLOCK_M, BLOCK_B if HAS_B else 1], dtype=tl.float32)
    for t in tl.range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
        rows = (t * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
        sa, dya, dsa, sb, dyb, dsb, rstd = _bwd_tile(S, DY, DS_OUT, RSTD, rows, ca, cb, stride_s,
                                                     stride_dy, stride_dso, M, H, HAS_DS_OUT,
                                                     HAS_B)
        dot = tl.sum(dya.to(tl.float32) * wa * sa.to(tl.float32), axis=1)
        if HAS_B:
            dot += tl.sum(dyb.to(tl.float32) * wb * sb.to(tl.float32), axis=1)
        c = dot[:, None] * rstd / H
        dwa += _bwd_part(DX, sa, dya, dsa, wa, rstd, c, rows, ca, stride_dx, M, H, HAS_DS_OUT)
        if HAS_B:
            dwb += _bwd_part(DX, sb, dyb, dsb, wb, rstd, c, rows, cb, stride_dx, M, H,
                             HAS_DS_OUT)
    dw_a = tl.sum(dwa, axis=0)[None, :]
    if HAS_B:
        dw_b = tl.sum(dwb, axis=0)[None, :]
    if DW_ATOMIC:
        # One launch for dx and dW: add this program's dW row into a zeroed fp32 workspace, then
        # count the program as done; the program that finishes last (it sees P - 1) writes the
        # sums as dW and leaves workspace and counter zeroed for the next call. Release on the
        # adds and acquire/release on the counter order every program's adds before the reads.
        tl.atomic_add(DW_ACC + ca, dw_a, mask=ca < H, sem="release")
        if HAS_B:
            tl.atomic_add(DW_ACC + cb, dw_b, mask=cb < H, sem="release")
        tl.debug_barrier()
        done = tl.atomic_add(COUNTER, 1, sem="acq_rel")
        if done == tl.num_programs(0) - 1:
            tl.debug_barrier()
            _dw_take(DW_ACC, DW, ca, H)
            if HAS_B:
                _dw_take(DW_ACC, DW, cb, H)
            tl.atomic_xchg(COUNTER, 0)
    else:
        part = DW_PART + pid.to(tl.int64) * H
        tl.store(part + ca, dw_a, mask=ca < H)
        if HAS_B:
            tl.store(part + cb, dw_b, mask=cb < H)


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


# Launch shape, chosen by bluelm_kernels/bench (see docs/KERNELS.md). Keys: forward rows per program
# and warps; backward warps, then per case (plain / with the residual's gradient: bwd_ /
# bwd_res_) rows per tile, programs per SM and pipeline stages; dW summed in the kernel (atomic)
# or by a second kernel, programs trimmed to equal tile counts, a row split in two power-of-two
# column parts, a register cap (0: none). Measured on one H100
# (bluelm_kernels/bench/results/h100_rmsnorm_pipelined_bwd_*, 8192 x 2560 bf16): plain backward 1 program/SM x
# 6 stages 0.0495 ms, residual 2/SM x 3 stages 0.0639 ms; the unpipelined loop with the next
# tile prefetched into registers by hand (the previous kernel) 0.0540 / 0.0655 ms. Deeper or
# shallower pipelines, 4 or 16 warps, 2-row tiles and 3-4 programs/SM were slower.
TUNE = {"fwd_rows": 2, "fwd_warps": 8, "bwd_warps": 8,
        "bwd_rows": 1, "bwd_per_sm": 1, "bwd_stages": 6,
        "bwd_res_rows": 1, "bwd_res_per_sm": 2, "bwd_res_stages": 3,
        "bwd_dw_atomic": 1, "bwd_even": 1, "bwd_split": 1, "bwd_maxnreg": 0,
        "bwd_programs_cpu": 4}


def _block(h):
    return triton.next_power_of_2(h)


def _warps(h, key, tune=None):
    return max(1, min((TUNE if tune is None else tune)[key], _block(h) // 128))


def _bwd_programs(m, device, rows, per_sm, tune=None):
    """Programs of the grid-stride backward: at most per_sm per SM, and as few as give every
    program the same number of row tiles (8192 tiles on 264 slots: 256 programs x 32 tiles, not
    264 with 8 of them doing a 32nd tile alone at the end). ``tune``: a kernel's launch table
    (default this module's TUNE; bluelm_kernels/layernorm.py passes its own)."""
    tune = TUNE if tune is None else tune
    tiles = triton.cdiv(m, rows)
    if device.type == "cuda":
        slots = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        slots = tune["bwd_programs_cpu"]  # interpreter: few programs
    slots = max(1, min(tiles, slots))
    if tune["bwd_even"]:
        return triton.cdiv(tiles, triton.cdiv(tiles, slots))
    return slots


def _bwd_stages(device, stages, per_sm, tile_bytes):
    """Pipeline stages of the backward loop, fewer where per_sm programs' stage buffers would
    not fit in 3/4 of an SM's shared memory (a large H): programs that are not all resident at
    once run the grid-stride loop in a second, slow wave. CPU (interpreter): as tuned; stages do
    not change results."""
    if device.type != "cuda" or stages <= 1:
        return stages
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0) or 100 * 1024
    return max(1, min(stages, (3 * smem // 4) // (per_sm * tile_bytes)))


def _col_parts(h, split=None):
    """Column parts of the backward: (next_pow2(h), 0), or with bwd_split (or ``split``) two
    powers of two covering h (2560 -> 2048 + 512; 100 -> 64 + 64)."""
    full = _block(h)
    if not (TUNE["bwd_split"] if split is None else split) or full == h or h <= 32:
        return full, 0
    return full // 2, _block(h - full // 2)


def _reg_cap(device, tune=None):
    """bwd_maxnreg > 0 caps the backward's registers per thread (PTX .maxnreg; CUDA only), so more
    programs fit on an SM at the price of possible spills."""
    cap = (TUNE if tune is None else tune)["bwd_maxnreg"]
    return {"maxnreg": cap} if cap and device.type == "cuda" else {}


_WORKSPACES = {}


def _dw_workspace(device, h):
    """The zeroed fp32 [H] dW accumulator and int32 done-counter of the one-launch backward.

    The kernel leaves both zeroed again, so they are allocated once per (device, stream, H): one
    per stream, because two backward kernels running at once must not share them.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, h)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.zeros(h, device=device, dtype=torch.float32),
                            torch.zeros(1, device=device, dtype=torch.int32))
    return _WORKSPACES[key]


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


def _forward(x, weight, eps, r2, dtype, parts=None):
    """Launch the forward on rows x [M, H] (or, with ``parts``, on the fp32 split-K partials
    [P, M, H]) with residual rows r2 [M, H] or None: (y, s, rstd) in ``dtype``; s is x itself
    without a residual."""
    m, h = x.shape[-2], x.shape[-1]
    y = torch.empty(m, h, device=x.device, dtype=dtype)
    s = torch.empty_like(y) if r2 is not None else x
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    bm = TUNE["fwd_rows"]
    split = {} if parts is None else dict(PARTS=x.shape[0], stride_part=x.stride(0), ROUND=True)
    _rmsnorm_fwd_kernel[(triton.cdiv(m, bm),)](
        x, x if r2 is None else r2, s, y, weight, rstd, x.stride(-2), (x if r2 is None else r2).stride(-2),
        s.stride(-2), y.stride(0), m, h, eps, HAS_RES=r2 is not None, BLOCK_M=bm, BLOCK=_block(h),
        num_warps=_warps(h, "fwd_warps"), **split,
    )
    return y, s, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps, passthrough=False):
        shape, h = x.shape, x.shape[-1]
        x2 = x.reshape(-1, h).contiguous()
        r2 = residual.reshape(-1, h).contiguous() if residual is not None else None
        y, s, rstd = _forward(x2, weight, eps, r2, x2.dtype)
        ctx.save_for_backward(s, weight, rstd)
        ctx.has_res, ctx.shape = residual is not None, shape
        if residual is None:
            # passthrough: x again, as a second output whose gradient the backward adds into dx
            return (y.view(shape), x.view_as(x)) if passthrough else y.view(shape)
        return y.view(shape), s.view(shape)

    @staticmethod
    def backward(ctx, dy, ds_out=None):
        s, weight, rstd = ctx.saved_tensors
        m, h = s.shape
        dy2 = dy.reshape(-1, h).contiguous()
        dso = ds_out.reshape(-1, h).contiguous() if ds_out is not None else dy2
        dx = torch.empty_like(s)
        case = "bwd_res_" if ds_out is not None else "bwd_"  # launch shape per case
        rows = TUNE[case + "rows"]
        nprog = _bwd_programs(m, s.device, rows, TUNE[case + "per_sm"])
        atomic = bool(TUNE["bwd_dw_atomic"]) and not torch.are_deterministic_algorithms_enabled()
        if atomic:  # dW summed in the kernel (order of the fp32 adds varies run to run)
            dw = torch.empty(h, device=s.device, dtype=weight.dtype)
            dw_acc, counter = _dw_workspace(s.device, h)
            dw_part = dw_acc  # unused
        else:  # [programs, H] partials summed by a second kernel in a fixed order
            dw_part = torch.empty(nprog, h, device=s.device, dtype=torch.float32)
            dw = dw_acc = counter = dw_part  # unused by the kernel
        block_a, block_b = _col_parts(h)
        tile_bytes = rows * (block_a + block_b) * s.element_size() * (3 if ds_out is not None
                                                                       else 2)
        stages = _bwd_stages(s.device, TUNE[case + "stages"], TUNE[case + "per_sm"], tile_bytes)
        _rmsnorm_bwd_kernel[(nprog,)](
            s, dy2, dso, dx, weight, rstd, dw_part, dw_acc, counter, dw, s.stride(0),
            dy2.stride(0), dso.stride(0), dx.stride(0), m, h, HAS_DS_OUT=ds_out is not None,
            BLOCK_M=rows, BLOCK_A=block_a, BLOCK_B=block_b,
            DW_ATOMIC=atomic, STAGES=stages,
            num_warps=_warps(h, "bwd_warps"), **_reg_cap(s.device),
        )
        if not atomic:
            dw = _sum_rows(dw_part, weight.dtype)
        dx = dx.view(ctx.shape)
        # x and residual get the same gradient (s = x + residual); autograd copies on accumulate.
        return dx, dw, (dx if ctx.has_res else None), None, None


def rmsnorm_partials(parts, weight, eps=1e-5, residual=None, dtype=None):
    """Forward-only RMSNorm of a matmul given as its fp32 split-K partials ``parts`` [P, M, H]
    (``split_k.partials``): the norm of ``parts.sum(0)`` rounded to ``dtype`` (default: the
    residual's), with the residual add as in ``rmsnorm``. The sum happens in this kernel, so a
    split matmul costs no reduction launch of its own."""
    dtype = dtype or (residual.dtype if residual is not None else weight.dtype)
    if parts.dim() != 3 or parts.dtype != torch.float32:
        raise ValueError(f"rmsnorm_partials: expected fp32 partials [P, M, H], got {parts.dtype} {tuple(parts.shape)}")
    if not use_triton(parts):
        return rmsnorm_ref(parts.sum(0).to(dtype), weight, eps, residual)
    h = parts.shape[-1]
    r2 = residual.reshape(-1, h).contiguous() if residual is not None else None
    y, s, _ = _forward(parts.contiguous(), weight, eps, r2, dtype, parts=True)
    return y if residual is None else (y, s)


def rmsnorm(x, weight, eps=1e-5, residual=None):
    """RMSNorm over the last dim. Returns `y`, or `(y, x + residual)` when `residual` is given."""
    if not use_triton(x):
        return rmsnorm_ref(x, weight, eps, residual)
    return _RMSNorm.apply(x, weight, residual, eps)


def rmsnorm_passthrough(x, weight, eps=1e-5):
    """(rmsnorm(x), x) where the gradient of the second output joins x's inside the norm's backward."""
    if not use_triton(x):
        return rmsnorm_ref(x, weight, eps), x
    return _RMSNorm.apply(x, weight, None, eps, True)


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

    def add_norm(self, x, residual):
        """(norm(x + residual), x + residual) in one pass each way: the backward adds the gradient that
        reaches the sum directly (the residual stream) into the norm's input gradient."""
        return rmsnorm(x, self.weight, self.eps, residual)

    def norm_passthrough(self, x):
        """(norm(x), x): x handed on (the residual stream) through the norm, so that the gradient
        reaching it is added inside the norm's backward launch, not by autograd in a pass of its own."""
        return rmsnorm_passthrough(x, self.weight, self.eps)
