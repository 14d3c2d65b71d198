"""Few-row matrix-vector products for decode, with the RMSNorm before them and the SwiGLU after
them fused in.

At batch 1 a decode step is a read of every weight once: ~4.4 GB for the 2.44B decoder, ~1 ms at
the H200's copy bandwidth. cuBLAS at one row reaches ~75% of that bandwidth, and the norms and the
SwiGLU between the matmuls are launches of their own (each a few microseconds of a step that has
~1.7 ms to spend). This kernel streams a [BLOCK_N, BLOCK_K] tile of W per iteration against the
M <= 8 rows of x kept in registers, with the reduction over K done once at the end, and optionally

* ``norm=(g, eps)``: x is first normalized, ``h = rmsnorm(x [+ residual]) * g`` with the statistics in
  fp32 and h rounded to x's dtype (exactly ``kernels.rmsnorm``'s output, so the product equals the
  unfused one up to summation order); with ``residual`` the sum ``s = x + residual`` (rounded, as
  ``rmsnorm`` returns it) is written too, by the first program: the next block's residual stream.
* ``swiglu=True``: W holds megatron's fused [gate; up] rows; the output is ``silu(g) * u`` with g and u
  rounded to the output dtype first (as ``kernels.swiglu`` sees them).

The launch shape (rows / columns per program, warps) is measured once per (M, N, K, variant) on the
device, outside CUDA-graph capture (``tune``: a handful of candidates, cuBLAS among them for the
plain product), since the best shape differs between a 2560-row and a 100k-row weight; captured
calls reuse what was measured (a shape seen first inside a capture uses the default).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton
from .dispatch import use_triton

MAX_ROWS = 8
# (BLOCK_N, BLOCK_K, warps); the first is the default
CANDIDATES = ((8, 512, 4), (4, 512, 4), (16, 256, 4), (32, 256, 8))  # few: each is a compile per variant
_TUNED: dict = {}
# Under the CPU interpreter each program is a Python loop: fewer, larger programs (tests only)
INTERPRETER_SHAPE = (64, 128, 4)


def gemv_ref(x, w, norm=None, residual=None, swiglu: bool = False):
    """torch reference: returns y, or (y, s) when a residual is given."""
    s = x if residual is None else x + residual
    h = s
    if norm is not None:
        g, eps = norm
        sf = s.float()
        h = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * g.float()).to(x.dtype)
    y = h @ w.t()
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = (F.silu(gate.float()) * up.float()).to(x.dtype)
    return y if residual is None else (y, s)


@triton.jit
def _gemv_kernel(X, R, G, S, W, Y, M, N, K, sx, sr, ss, sw, sy, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NORM: tl.constexpr, RES: tl.constexpr, SWIGLU: tl.constexpr):
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    mmask = rm < M
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rk = tl.arange(0, BLOCK_K)
    if NORM:
        sq = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            xm = mmask[:, None] & (k < K)[None, :]
            xs = tl.load(X + rm[:, None] * sx + k[None, :], mask=xm, other=0.0)
            if RES:
                xs = (xs.to(tl.float32) + tl.load(R + rm[:, None] * sr + k[None, :], mask=xm,
                                                  other=0.0).to(tl.float32)).to(X.dtype.element_ty)
                if pid == 0:
                    tl.store(S + rm[:, None] * ss + k[None, :], xs, mask=xm)
            xf = xs.to(tl.float32)
            sq += xf * xf
        rstd = 1.0 / tl.sqrt(tl.sum(sq, 1) / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    if SWIGLU:
        acc2 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        kmask = k < K
        xm = mmask[:, None] & kmask[None, :]
        h = tl.load(X + rm[:, None] * sx + k[None, :], mask=xm, other=0.0)
        if NORM:
            if RES:
                h = (h.to(tl.float32) + tl.load(R + rm[:, None] * sr + k[None, :], mask=xm,
                                                other=0.0).to(tl.float32)).to(X.dtype.element_ty)
            g = tl.load(G + k, mask=kmask, other=0.0).to(tl.float32)
            h = (h.to(tl.float32) * rstd[:, None] * g[None, :]).to(X.dtype.element_ty)
        hf = h.to(tl.float32)[:, None, :]
        wm = nmask[:, None] & kmask[None, :]
        w = tl.load(W + rn[:, None].to(tl.int64) * sw + k[None, :], mask=wm, other=0.0)
        acc += hf * w.to(tl.float32)[None, :, :]
        if SWIGLU:
            w2 = tl.load(W + (rn[:, None] + N).to(tl.int64) * sw + k[None, :], mask=wm, other=0.0)
            acc2 += hf * w2.to(tl.float32)[None, :, :]
    y = tl.sum(acc, 2)
    if SWIGLU:
        gate = y.to(Y.dtype.element_ty).to(tl.float32)
        up = tl.sum(acc2, 2).to(Y.dtype.element_ty).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
    ym = mmask[:, None] & nmask[None, :]
    tl.store(Y + rm[:, None] * sy + rn[None, :], y.to(Y.dtype.element_ty), mask=ym)


def _shape(cfg, m: int, swiglu: bool):
    """A candidate written for one row, scaled so the fp32 accumulators stay ~32 registers a thread."""
    block_n, block_k, warps = cfg
    m_pad = triton.next_power_of_2(m)
    block_k = max(64, block_k // m_pad)
    if swiglu:
        block_n = max(2, block_n // 2)
    return block_n, block_k, warps


def _launch(cfg, x, w, y, s, g, r, n, eps, norm, res, swiglu):
    m, k = x.shape
    block_n, block_k, warps = _shape(cfg, m, swiglu)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, r, g, s, w, y, m, n, k, x.stride(0), r.stride(0), s.stride(0), w.stride(0), y.stride(0), eps,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm, RES=res,
        SWIGLU=swiglu, num_warps=warps)


def _time(fn, reps: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def gemv(x: torch.Tensor, w: torch.Tensor, norm=None, residual: torch.Tensor | None = None,
         swiglu: bool = False):
    """y = f(x) @ w.T for x [M <= 8, K], w [N, K] (N = 2F with ``swiglu``; y [M, F]); see the module
    docstring for ``norm`` / ``residual`` / ``swiglu``. Returns y, or (y, s) with a residual."""
    if residual is not None and norm is None:
        raise ValueError("gemv: a residual is added only in front of a norm")
    if not use_triton(x) or x.shape[0] > MAX_ROWS:
        return gemv_ref(x, w, norm, residual, swiglu)
    assert x.stride(1) == 1 and w.stride(1) == 1 and x.shape[1] == w.shape[1]
    m = x.shape[0]
    n = w.shape[0] // 2 if swiglu else w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    res = residual is not None
    s = torch.empty_like(x) if res else y
    r = residual if res else x
    g, eps = norm if norm is not None else (x, 0.0)
    key = (m, n, x.shape[1], norm is not None, res, swiglu, x.dtype, x.device)
    cfg = _TUNED.get(key)
    if cfg is None:
        cfg = tune(key, x, w, y, s, g, r, n, eps) if _can_tune(x) else CANDIDATES[0] if x.is_cuda else INTERPRETER_SHAPE
    if cfg == "torch":
        return gemv_ref(x, w, norm, residual, swiglu)
    _launch(cfg, x, w, y, s, g, r, n, eps, norm is not None, res, swiglu)
    return y if not res else (y, s)


def _can_tune(x: torch.Tensor) -> bool:
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()


def tune(key, x, w, y, s, g, r, n, eps):
    """Time the candidates for this call's shape (outputs are overwritten with identical values: the
    kernel is a pure function of its inputs) and remember the fastest."""
    _, _, _, has_norm, res, swiglu, _, _ = key
    times = {}
    for cfg in CANDIDATES:
        times[cfg] = _time(lambda c=cfg: _launch(c, x, w, y, s, g, r, n, eps, has_norm, res, swiglu))
    if not has_norm and not swiglu:
        times["torch"] = _time(lambda: torch.mm(x, w.t(), out=y))
    best = min(times, key=times.get)
    _TUNED[key] = best
    return best
