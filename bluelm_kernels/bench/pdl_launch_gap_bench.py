"""What programmatic dependent launch (PDL) saves between the decode step's kernels (one CUDA graph).

    python -m bluelm_kernels.bench.pdl_launch_gap_bench

A chain of 120 small Triton kernels (one 2048-element row each, the size of a decode RMSNorm at one
row), captured in a CUDA graph, with and without PDL (``launch_pdl=True`` plus ``gdc_wait`` /
``gdc_launch_dependents`` in the kernel), alone and with a [1, 2048] x [2048, 2048] cuBLAS GEMV between
consecutive kernels (the decode step's norm -> GEMM -> norm pattern). Prints microseconds per link.
"""
from __future__ import annotations

import sys
import time

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

LINKS = 120


@triton.jit
def _scale_add(X, Y, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
    if PDL:
        gdc_wait()  # the previous kernel's writes are visible after this
        gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=m) * 1.0001 + 1.0, mask=m)


def _chain(bufs, w, pdl: bool, gemm: bool):
    x = bufs[0]
    for i in range(LINKS):
        y = bufs[(i + 1) % 2]
        _scale_add[(1,)](x, y, x.numel(), PDL=pdl, BLOCK=2048, launch_pdl=pdl, num_warps=4)
        x = (y.view(1, -1) @ w).view(-1) if gemm else y
    return x


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("pdl_launch_gap_bench needs a CUDA GPU")
    print("triton", triton.__version__)
    for gemm in (False, True):
        for pdl in (False, True):
            bufs = [torch.randn(2048, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
            w = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                for _ in range(2):
                    _chain(bufs, w, pdl, gemm)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                _chain(bufs, w, pdl, gemm)
            for _ in range(5):
                g.replay()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                g.replay()
            torch.cuda.synchronize()
            us = (time.perf_counter() - t) / 50 * 1e6 / LINKS
            print(f"gemm={gemm} pdl={pdl}: {us:.2f} us per triton kernel" + (" + GEMV" if gemm else ""), flush=True)


if __name__ == "__main__":
    main()
