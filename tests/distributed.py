"""Run a function on N gloo ranks (separate processes) and collect what each rank returns.

    results = run_distributed(fn, 4, arg1, arg2)   # results[rank] = fn(arg1, arg2) on that rank

``fn`` must be importable (module-level). Each rank gets the torchrun environment variables, its
share of the cores as OpenMP threads (``rank_threads``), and a free port; an exception on any rank
fails the call with that rank's traceback.

    results = run_distributed(phases, 4, [phase(fn1, a), phase(fn2, b)])   # results[rank] = [fn1(a), fn2(b)]

runs several calls one after the other in the same ranks: one process start (about 6 s of imports
per rank) for several runs. Each call sets up and tears down its own process group on its own port.
Use it for runs of one parallel layout: megatron-core keeps some state of the first layout across a
re-initialization (seen: checkpoint replica ids).
"""
from __future__ import annotations

import functools
import inspect
import os
import pickle
import socket
import traceback

import torch
import torch.multiprocessing as mp


def _defer_torch_compile() -> None:
    """In a rank that run_distributed starts (it imports this module before the function it runs):
    megatron-core wraps its fusion functions in ``torch.compile`` when it is imported, and that call
    imports torch._dynamo and inductor, ~1.3 s of CPU in every rank's start, for functions the CPU
    path never runs. ``torch.compile`` compiles a function at its first call anyway; here the import
    waits for that call too. Modules go to torch.compile as they are."""
    real = torch.compile
    if getattr(real, "deferred", False):
        return

    def compile(model=None, **kwargs):
        if model is None:  # @torch.compile(...) with options
            return lambda fn: compile(fn, **kwargs)
        if not inspect.isfunction(model):
            return real(model, **kwargs)
        compiled = []

        @functools.wraps(model)
        def first_call_compiles(*args, **kw):
            if not compiled:
                compiled.append(real(model, **kwargs))
            return compiled[0](*args, **kw)

        return first_call_compiles

    compile.deferred = True
    torch.compile = compile


_RANK_ENV = "BLUELM_TEST_RANK"  # set for the ranks run_distributed starts, so this runs in them only
if os.environ.get(_RANK_ENV):
    _defer_torch_compile()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_threads(world_size: int) -> int:
    """Intra-op threads per rank: the machine's cores shared out among the ranks (as torchrun does,
    one each when there are more ranks than cores). A single rank gets every core: the tiny model's
    vocabulary GEMMs dominate the one-rank training tests, and with 1 thread of 2 they ran ~1.6x
    slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // world_size)


def _worker(rank, world_size, port, fn, args, queue):
    threads = rank_threads(world_size)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    import torch

    torch.set_num_threads(threads)
    try:
        # Plain pickle copies tensors into the message; torch's shared-memory passing would break
        # when this process exits before the parent has read the result.
        queue.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # report every failure to the parent, then exit
        queue.put((rank, "error", traceback.format_exc()))


def phase(fn, *args) -> tuple:
    """One call of ``phases``: ``fn(*args)`` on a rendezvous port of its own."""
    return fn, args, free_port()


def phases(calls: list) -> list:
    """Worker: each ``phase`` in turn, in this same set of ranks; the list of their results."""
    results = []
    for fn, args, port in calls:
        os.environ["MASTER_PORT"] = str(port)
        results.append(fn(*args))
    return results


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    # The free port is found by binding port 0 and closing it, so another process can take it before
    # rank 0's store listens on it: that case (and only that one) starts the run again on a new port.
    for attempt in range(3):
        try:
            return _run_distributed(fn, world_size, *args, timeout=timeout)
        except RuntimeError as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise


def _run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    os.environ[_RANK_ENV] = "1"  # a spawned process starts with the environment of this moment
    try:
        for p in procs:
            p.start()
    finally:
        os.environ.pop(_RANK_ENV)
    results, errors = [None] * world_size, []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{value}")
                break  # the others may now hang on a collective: stop them below
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
    return results
