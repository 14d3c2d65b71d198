"""Kernel benchmarks (CUDA) and what they share."""
import time

import torch


def graph_ms(fn, iters: int = 50) -> float:
    """GPU milliseconds per call of ``fn``: one warm-up call, then ``fn`` captured in a CUDA graph and
    replayed ``iters`` times (launch overhead and the host out of the figure)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        g.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / iters
