"""Run a function on N gloo ranks (separate processes) and collect what each rank returns.

    results = run_distributed(fn, 4, arg1, arg2)   # results[rank] = fn(arg1, arg2) on that rank

``fn`` must be importable (module-level). Each rank gets the torchrun environment variables, its
share of the cores as OpenMP threads (``rank_threads``), and a free port; an exception on any rank
fails the call with that rank's traceback. Ranks fork from a fork server that has imported torch and
megatron-core once per test session (``PRELOAD``), and take the caller's environment, stdout and
stderr, as a spawned process would.

    results = run_distributed(phases, 4, [phase(fn1, a), phase(fn2, b)])   # results[rank] = [fn1(a), fn2(b)]

runs several calls one after the other in the same ranks: one process start (the project's imports,
under a second per rank) for several runs. Each call sets up and tears down its own process group on
its own port.
Use it for runs of one parallel layout: megatron-core keeps some state of the first layout across a
re-initialization (seen: checkpoint replica ids).
"""
from __future__ import annotations

import functools
import inspect
import os
import pickle
import socket
import sys
import traceback

import torch
import torch.multiprocessing as mp

# Ranks fork from one fork server per test session that has imported these (the imports a rank would
# otherwise repeat in every fresh interpreter: ~4-5 s of CPU per rank, 8 ranks on 2 cores ~20 s per
# start). The server only imports: it runs no torch op, so no OpenMP pool exists to be forked, and it
# runs no other thread than numpy's idle BLAS helper, which a fork does not copy. Nothing of this
# project is preloaded: its modules (and Triton's choice of interpreter vs compiler, made when a
# kernel module is imported) load in the rank, after the rank has taken the caller's environment.
# The fork server is one per process (the preprocessing pool uses it too), so the list is set at
# import, before anything starts it.
PRELOAD = ["torch", "torch.distributed", "numpy", "yaml", "sentencepiece",
           "megatron.core.parallel_state", "megatron.core.tensor_parallel", "megatron.core.models.gpt",
           "megatron.core.transformer.transformer_block", "megatron.core.distributed", "megatron.core.optimizer",
           "megatron.core.pipeline_parallel", "megatron.core.dist_checkpointing",
           "megatron.core.dist_checkpointing.strategies.torch", "megatron.core.datasets.gpt_dataset",
           "megatron.core.datasets.blended_megatron_dataset_builder"]
_START = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
if _START == "forkserver":
    mp.set_forkserver_preload(PRELOAD)


def _defer_torch_compile() -> None:
    """In a rank that run_distributed starts (it imports this module before the function it runs):
    megatron-core wraps its fusion functions in ``torch.compile`` when it is imported, and that call
    imports torch._dynamo and inductor, ~1.3 s of CPU in every rank's start, for functions the CPU
    path never runs. ``torch.compile`` compiles a function at its first call anyway; here the import
    waits for that call too. Modules go to torch.compile as they are. (Under the fork server the
    preloaded megatron-core paid that import once, in the server; this covers what a rank imports
    itself, and ranks started by "spawn".)"""
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


class _CallerStdio:
    """Sent to a rank: its stdout and stderr become the caller's of this moment (a forked rank holds
    the fork server's; pytest's capfd reads what the ranks print)."""

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return _take_stdio, (DupFd(1), DupFd(2))


def _take_stdio(out, err) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, dup in ((1, out), (2, err)):
        src = dup.detach()
        os.dup2(src, fd)
        os.close(src)


def _worker(rank, world_size, port, fn, args, queue, environ, stdio=None):
    # A forked rank holds the fork server's environment (of the session's first start): take the
    # caller's of this moment, as a spawned process would have.
    os.environ.clear()
    os.environ.update(environ)
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
    ctx = mp.get_context(_START)
    queue = ctx.Queue()
    port = free_port()
    os.environ[_RANK_ENV] = "1"  # a spawned process starts with the environment of this moment
    try:
        environ = dict(os.environ)
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, environ, _CallerStdio()))
                 for r in range(world_size)]
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
