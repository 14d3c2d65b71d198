"""Kernel benchmarks (CUDA) and what they share."""
import json
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


def finish_checks(res: list, out=None, payload=None, note: str = "") -> None:
    """The end of a kernel benchmark whose rows carry ``ok``: how many passed their checks (``note``
    after the count; every failed row printed), ``payload`` (default: the rows) written to ``out`` as
    JSON when given, and exit status 1 when a check failed."""
    bad = [r for r in res if not r["ok"]]
    print(f"\nchecks: {len(res) - len(bad)}/{len(res)} ok{note}" + "".join(f"\n  FAILED {json.dumps(r)}" for r in bad))
    if out:
        with open(out, "w") as f:
            json.dump(res if payload is None else payload, f, indent=1)
    if bad:
        raise SystemExit(1)
