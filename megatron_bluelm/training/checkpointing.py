"""Distributed checkpoints: save every N steps and on preemption, resume exactly, reshard on load.

On disk (see docs/CHECKPOINTS.md)::

    SAVE/iter_0000020/   megatron-core dist_checkpointing (torch_dist): model, optimizer, RNG per rank
                         + meta.json: iteration, consumed samples, scheduler, layout, config
    SAVE/latest          "20": written (temp file + fsync + os.replace) after every rank finished

Completion: ``meta.json`` is written by rank 0 only after the sharded save returned on every rank (a
barrier), and ``latest`` only after ``meta.json``. A process killed at any moment of a save leaves
either the previous ``latest`` (the new directory has no ``meta.json`` and is ignored on resume) or the
new one, complete. Tensors are stored by *global* name and shape (megatron-core ShardedTensors), so a
checkpoint loads into any TP x PP x DP layout; the optimizer state too (``fully_reshardable``
for the distributed optimizer), also into the other optimizer (a resume may switch
``parallel.distributed_optimizer``: see "optimizer switch" below). RNG states are per rank and restored
only into the same TP x PP x DP layout.

With ``checkpoint.async_save`` the shards are written by a forked writer process while training
goes on; ``meta.json`` and ``latest`` are written only when every rank's writer has finished (its
files fsynced), at a later step end, so the completion rule above holds unchanged. Writer processes
ignore the preemption signal (torchrun sends SIGTERM to the whole process group) and die with the
training process (``PR_SET_PDEATHSIG``), so neither a preemption nor a kill -9 leaves a half-written
checkpoint marked complete or an orphaned writer behind.

Every save (blocking or async) copies the tensors it writes into host buffers the Checkpointer owns
(``training/host_staging.py``: reused by every save, page-locked on CUDA, reserved in the background
after the first step); the writer writes from there.
"""
from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import threading
import time
from functools import partial
from multiprocessing.managers import SyncManager
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException as _DCPError  # a BaseException, not Exception

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.loader import to_dict
from megatron_bluelm.training.host_staging import HostStaging, staged_sizes
from megatron_bluelm.training.model_setup import use_fused_adam
from megatron_bluelm.training.optimizer_state import save_with_device_gather
from megatron_bluelm.training.writer_guard import die_with_parent, manager_init

FORMAT_VERSION = 1
META = "meta.json"
LATEST = "latest"
ITER_RE = re.compile(r"^iter_(\d{7})$")
# Test hooks only (tests/checkpoint/): "ITER:SECONDS" sleeps that long in the save of iteration ITER.
# SLOW_SAVE_ENV: after the tensors are written, before the checkpoint is marked complete (so a test can
# kill -9 the run in the middle of a save). SLOW_WRITE_ENV: in the async writer process, before it
# writes (so a test can watch training go on, and kill -9 the run while the shards are being written).
SLOW_SAVE_ENV = "MEGATRON_BLUELM_TEST_SLOW_SAVE"
SLOW_WRITE_ENV = "MEGATRON_BLUELM_TEST_SLOW_ASYNC_WRITE"
# The distributed optimizer's format whose tensors are per *model* parameter: reshardable over TP/PP/DP.
SHARDED_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                    "singleton_local_shards": False, "chained_optim_avoid_prefix": True}
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# megatron-core's own files in a torch_dist checkpoint directory.
MCORE_METADATA = "metadata.json"
DCP_METADATA = ".metadata"
COMMON = "common.pt"


class CheckpointError(ConfigError):
    """A checkpoint directory is missing, incomplete, damaged, or does not fit the configured model."""


class Preempted(Exception):
    """Raised at a step end after a preemption signal, once the checkpoint is saved: training stops."""


# ----------------------------------------------------------------------------- directory layout

def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def list_iterations(root: str) -> list[int]:
    """Iterations with a directory under ``root`` (complete or not), ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(ITER_RE.match, os.listdir(root)) if m)


def read_latest(root: str) -> Optional[int]:
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def _write_atomic(path: str, text: str) -> None:
    """Readers see the old file or the new one, never a partial one (also across a power loss)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable only once the directory is synced
    finally:
        os.close(fd)


def read_meta(path: str) -> dict:
    file = os.path.join(path, META)
    try:
        with open(file) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is damaged (not valid JSON: {e}); resume from an earlier "
                              f"iteration directory or repair the file") from e


def resolve_checkpoint(root: str) -> tuple[Optional[str], list[str]]:
    """(directory of the newest complete checkpoint or None, notes about what was skipped)."""
    if not os.path.isdir(root):
        raise CheckpointError(f"checkpoint directory '{root}' does not exist")
    if ITER_RE.match(os.path.basename(os.path.normpath(root))):  # pointed at one iteration directly
        if not is_complete(root):
            raise CheckpointError(f"checkpoint '{root}' is incomplete (no {META}): its save was interrupted")
        return root, []
    latest = read_latest(root)
    notes = [f"ignoring incomplete checkpoint {iter_dir(root, i)} (no {META}: its save was interrupted)"
             for i in list_iterations(root) if (latest is None or i > latest) and not is_complete(iter_dir(root, i))]
    if latest is None:
        return None, notes
    path = iter_dir(root, latest)
    if not is_complete(path):
        raise CheckpointError(f"{os.path.join(root, LATEST)} names iteration {latest}, but '{path}' is "
                              f"missing or incomplete")
    return path, notes


def verify_files(path: str) -> None:
    """Check the files of a complete checkpoint before megatron-core reads them, so that a damaged
    one fails naming the file (megatron-core's and torch's errors name none): megatron-core's
    ``metadata.json``, torch DCP's ``.metadata`` (which lists every shard file with the byte range of
    each tensor), every shard file's presence and length, and ``common.pt``."""
    from torch.distributed.checkpoint import FileSystemReader

    def damaged(name: str, why: str, cause: Optional[BaseException] = None):
        err = CheckpointError(f"checkpoint file {os.path.join(path, name)} {why}; resume from another "
                              f"iteration directory (checkpoint.load: .../iter_NNNNNNN) or save again")
        raise err from cause

    for name in (MCORE_METADATA, DCP_METADATA, COMMON):
        if not os.path.isfile(os.path.join(path, name)):
            damaged(name, "is missing")
    try:
        with open(os.path.join(path, MCORE_METADATA)) as f:
            json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        damaged(MCORE_METADATA, f"is damaged (not valid JSON: {e})", e)
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # unpickling a truncated or garbled file raises many types
        damaged(DCP_METADATA, f"is damaged ({type(e).__name__}: {e})", e)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            damaged(name, f"is missing ({DCP_METADATA} lists it)")
        size = os.path.getsize(file)
        if size < end:
            damaged(name, f"is truncated: {size} bytes, {DCP_METADATA} needs {end}")
    try:
        torch.load(os.path.join(path, COMMON), map_location="cpu", weights_only=True)
    except Exception as e:
        damaged(COMMON, f"is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", e)


def prune(root: str, keep_last: int, latest: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints; never the one ``latest`` names."""
    complete = [i for i in list_iterations(root) if i <= latest and is_complete(iter_dir(root, i))]
    keep = set(complete[-max(keep_last, 1):]) | {latest}
    for i in list_iterations(root):
        if i < latest and i not in keep:
            shutil.rmtree(iter_dir(root, i), ignore_errors=True)


def mark_complete(root: str, iteration: int, meta: dict, keep_last: int) -> None:
    """After every rank's shards are on disk (rank 0 only): meta.json, then ``latest``, then pruning."""
    _write_atomic(os.path.join(iter_dir(root, iteration), META), json.dumps(meta, indent=1))
    _write_atomic(os.path.join(root, LATEST), str(iteration))
    prune(root, keep_last, iteration)


def check_writable(root: str) -> None:
    """Create ``root`` and write, fsync and delete a probe file in it: a save directory that cannot be
    written fails before training starts, not at the first save (with save_interval 0: at the end)."""
    probe = os.path.join(root, f".write_probe.{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"checkpoint.save: cannot write to '{root}' ({e.strerror or e}); choose a "
                              f"writable directory") from e


# ----------------------------------------------------------------------------- writer processes

_FORK_PARENT: dict = {}
_WRITER_MANAGER: Optional[SyncManager] = None
# The thread that starts the Manager in the background lives as long as it: PR_SET_PDEATHSIG fires when
# the *thread* that started a process exits, not the process.
_MANAGER_THREAD: Optional[threading.Thread] = None
_MANAGER_READY, _MANAGER_STOP = threading.Event(), threading.Event()


def _guard_forked_child() -> None:
    die_with_parent(_FORK_PARENT["pid"])


def guard_writer_processes(background: bool = False) -> None:
    """Make megatron-core's checkpoint writer processes safe under preemption and kill -9.

    * Forked writers (the per-save workers and the async writer) inherit this process's signal
      handlers (the preemption flag), so a SIGTERM to the process group leaves them writing; an
      at-fork hook gives each forked child ``PR_SET_PDEATHSIG`` so none outlives a killed trainer.
    * The results queue is served by a spawned Manager process, which starts with default handlers:
      we start it ourselves, ignoring the preemption signals and dying with its parent.

    ``background``: start the Manager from a thread and return (a spawned interpreter imports the
    training's main module, torch and megatron-core included: seconds of the first save otherwise);
    the next call without it waits for that start (and starts it here if the thread could not).
    """
    global _MANAGER_THREAD
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if "pid" not in _FORK_PARENT:
        os.register_at_fork(before=lambda: _FORK_PARENT.update(pid=os.getpid()),
                            after_in_child=_guard_forked_child)
        _FORK_PARENT["pid"] = os.getpid()
    if _MANAGER_THREAD is not None:
        if background:
            return
        _MANAGER_READY.wait()
    if filesystem_async._results_queue is None:
        if background:
            _MANAGER_THREAD = threading.Thread(target=_manager_thread, daemon=True, name="checkpoint-writer-manager")
            _MANAGER_THREAD.start()
        else:
            _start_writer_manager()


def writer_helpers_starting() -> bool:
    """The background start of ``guard_writer_processes(background=True)`` is still under way."""
    return _MANAGER_THREAD is not None and not _MANAGER_READY.is_set()


def _start_writer_manager() -> None:
    global _WRITER_MANAGER
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=manager_init, initargs=(os.getpid(),))
    _WRITER_MANAGER, filesystem_async._results_queue = manager, manager.Queue()


def _manager_thread() -> None:
    try:
        _start_writer_manager()
    except Exception:  # the save starts it itself, and raises what fails
        pass
    finally:
        _MANAGER_READY.set()
    _MANAGER_STOP.wait()


def _stop_writer_manager() -> None:
    """Stop the results-queue Manager (megatron-core never stops the one it starts)."""
    global _WRITER_MANAGER, _MANAGER_THREAD
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _MANAGER_THREAD is not None:
        _MANAGER_READY.wait()

    queue = filesystem_async._results_queue
    manager = _WRITER_MANAGER or getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()
    filesystem_async._results_queue = None
    _WRITER_MANAGER = None
    if _MANAGER_THREAD is not None:
        _MANAGER_STOP.set()
        _MANAGER_THREAD.join()
        _MANAGER_THREAD = None
        _MANAGER_READY.clear()
        _MANAGER_STOP.clear()


def _slow_write(seconds: float, write_fn, *args, **kwargs):
    print(f"test hook {SLOW_WRITE_ENV}: async writer pausing {seconds}s", flush=True)
    time.sleep(seconds)
    return write_fn(*args, **kwargs)


def _hook_seconds(env: str, iteration: int) -> Optional[float]:
    spec = os.environ.get(env)
    if spec:
        at, seconds = spec.split(":")
        if int(at) == iteration:
            return float(seconds)
    return None


def _describe_write_failure(path: str, root: str, exc: BaseException) -> str:
    """A one-paragraph account of a failed save: what failed, where, and the likely cause."""
    causes, todo = [], [exc]
    while todo:  # the exception chain, and the per-rank failures torch DCP wraps in its CheckpointException
        e = todo.pop()
        if e is None or any(e is c for c in causes):
            continue
        causes.append(e)
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]
    os_errors = [c for c in causes if isinstance(c, OSError)]
    root_cause = causes[-1]
    detail = f"{type(root_cause).__name__}: {str(root_cause).splitlines()[0] if str(root_cause) else ''}"
    hints = []
    for c in os_errors:
        if c.errno in (errno.ENOSPC, errno.EDQUOT):
            hints.append("the disk (or quota) is full")
        elif c.errno == errno.EFBIG:
            hints.append("a file exceeds the file-size limit")
        elif c.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            hints.append("the directory is not writable")
        if c.filename:
            hints.append(f"file {c.filename}")
    try:
        free = shutil.disk_usage(root).free
        hints.append(f"{free / 2**30:.2f} GiB free on its filesystem")
    except OSError:
        pass
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            hints.append(f"this process's file-size limit (ulimit -f) is {limit} bytes")
            full = [f for f in sorted(os.listdir(path)) if os.path.getsize(os.path.join(path, f)) >= limit]
            hints += [f"{os.path.join(path, f)} reached that limit" for f in full]
    except (ImportError, ValueError, OSError):
        pass
    latest = read_latest(root) if os.path.isdir(root) else None
    return (f"writing checkpoint '{path}' failed on rank {dist.get_rank()} ({detail}); "
            + "; ".join(dict.fromkeys(hints)) + ". The directory has no meta.json and is ignored on resume; "
            + (f"the last complete checkpoint is iteration {latest}" if latest is not None
               else "there is no complete checkpoint yet"))


# ----------------------------------------------------------------------------- state

def _layout(run) -> dict:
    return {"tp": run.info.tp, "pp": run.info.pp, "dp": run.info.dp, "vpp": run.cfg.parallel.vpp,
            "world_size": run.info.world_size, "distributed_optimizer": run.cfg.parallel.distributed_optimizer}


def _ranks(layout: dict) -> dict:
    return {k: v for k, v in layout.items() if k != "distributed_optimizer"}


def _rng_state() -> dict:
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(state) -> ShardedObject:
    """One RNG state per rank, keyed by its (pp, tp, dp) coordinate."""
    shape = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_data_parallel_world_size())
    offset = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def finish_param_gather(model) -> None:
    """Bring every rank's full parameters up to date. With ``overlap_param_gather`` the distributed
    optimizer updates only this rank's shard of each parameter and the all-gather of the others runs
    during the next forward pass; reading the weights before that (a save, an export) would see the
    other ranks' shards one step old. A synchronous all-gather now; the next forward then finds the
    gather done and starts none."""
    for chunk in model:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.use_distributed_optimizer and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def model_sharded_state_dict(model) -> dict:
    """One entry per model chunk; tensors carry their global name, shape and offset."""
    return {f"model{i}": getattr(chunk, "module", chunk).sharded_state_dict(metadata=SHARDED_METADATA)
            for i, chunk in enumerate(model)}


def _init_adam_state(optimizer) -> None:
    """Give a not-yet-stepped Adam its (zero) state. Without Apex/TE, megatron-core's distributed
    optimizer reads the per-parameter ``step`` to build its state dict, so loading into a fresh
    optimizer needs the state to exist; the loaded values then overwrite these zeros."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p.data),
                                      "exp_avg_sq": torch.zeros_like(p.data)}


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


def _load_optimizer(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` plus two fixes for megatron-core 0.16.1's distributed optimizer
    without Apex/TE (torch Adam keeps a per-parameter ``step``): the ``fully_reshardable`` loader copies
    every state key but its source has no ``step`` (KeyError), and ``load_state_dict`` gives all
    parameters ONE shared ``step`` tensor, which torch Adam would then increment once per parameter.
    The step value itself is restored by ``load_state_dict`` from the saved param groups."""
    from megatron.core.optimizer import distrib_optimizer

    patched = []
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        for opt in _distributed_optimizers(optimizer):
            def set_states(model_param, tensors, _opt=opt, _orig=opt._set_main_param_and_optimizer_states):
                if "step" not in tensors:
                    group, order = _opt.model_param_group_index_map[model_param]
                    main = _opt.optimizer.param_groups[group]["params"][order]
                    tensors = {**tensors, "step": _opt.optimizer.state[main]["step"]}
                _orig(model_param, tensors)

            opt._set_main_param_and_optimizer_states = set_states  # this instance, this call only
            patched.append(opt)
    try:
        optimizer.load_state_dict(state)
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for param_state in opt.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = param_state["step"].clone()
    use_fused_adam(optimizer)  # the loaded groups carry the saved run's flags


def build_sharded_state_dict(run, *, is_loading: bool, optimizer: bool = True, rng: bool = True,
                             frozen: Optional[list] = None) -> dict:
    """``frozen``: which of ``run.frozen_models`` to include (None: all)."""
    if not is_loading:
        finish_param_gather(run.model)
    sd = model_sharded_state_dict(run.model)
    if optimizer:
        if is_loading:
            _init_adam_state(run.optimizer)
        # A save builds the distributed optimizer's state on the device (megatron-core's own round trip
        # through host buffers was most of a save's blocking time: training/optimizer_state.py).
        with contextlib.nullcontext() if is_loading else save_with_device_gather(run.optimizer):
            sd["optimizer"] = run.optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=SHARDED_METADATA)
    if rng:
        sd["rng_state"] = _rng_object(_rng_state())
    names = sorted(run.frozen_models) if frozen is None else frozen
    sd.update(frozen_sharded_state_dict(run, names))
    return sd


def frozen_sharded_state_dict(run, names) -> dict:
    """Frozen models a stage keeps beside the trained one (RL's reference policy), under their own
    tensor-name prefix, so a resume restores them instead of re-deriving them from the trained model."""
    return {f"{name}{i}": getattr(c, "module", c).sharded_state_dict(prefix=f"{name}.", metadata=SHARDED_METADATA)
            for name in names for i, c in enumerate(run.frozen_models[name])}


def check_shapes(sharded: dict, ckpt_path: str) -> None:
    """Fail naming the tensor and both shapes, before megatron-core fails less legibly."""
    saved = dist_checkpointing.load_tensors_metadata(ckpt_path)
    for chunk in (v for k, v in sharded.items() if k.startswith("model")):
        for ten in chunk.values():
            if not isinstance(ten, ShardedTensor):
                continue
            if ten.key not in saved:
                raise CheckpointError(f"checkpoint '{ckpt_path}' has no tensor '{ten.key}' (the configured model "
                                      f"has it, shape {tuple(ten.global_shape)})")
            have = tuple(saved[ten.key].global_shape)
            if have != tuple(ten.global_shape):
                raise CheckpointError(f"shape mismatch for '{ten.key}': checkpoint '{ckpt_path}' has {have}, "
                                      f"the configured model has {tuple(ten.global_shape)}")


def optimizer_switched(meta: dict, run) -> bool:
    """Whether the checkpoint holds the other optimizer's state (distributed vs plain)."""
    saved = meta["layout"].get("distributed_optimizer")
    return saved is not None and bool(saved) != bool(run.cfg.parallel.distributed_optimizer)


# ----------------------------------------------------------------------------- optimizer switch
#
# The plain and the distributed optimizer keep the same Adam state in different shapes (whole
# parameters vs. flat per-DP-rank shards of the main parameters) and megatron-core stores their
# non-tensor parts differently (``common.pt``: the step as ``common_step`` vs. in each param group;
# param groups with vs. without ``params``), so loading one into the other fails inside megatron-core
# (KeyError 'pre_wd_mult'). Both do store every moment in *model space*: one tensor per model
# parameter, under ``optimizer.state.exp_avg.<param key>`` / ``exp_avg_sq`` with the parameter's
# global shape (the distributed optimizer in its ``fully_reshardable`` format, which we always save).
# A switch therefore loads those tensors for this rank's parameters (its TP/PP slice of each, whole),
# then places them into the optimizer this run has: whole for the plain one, the rank's flat range for
# the distributed one (as megatron-core's own ``fully_reshardable`` loader does). fp32 main parameters
# come from ``optimizer.state.param.<key>`` (distributed), ``optimizer.state.fp32_param.<key>`` (plain
# bf16), or the weights themselves (plain fp32, whose main parameters are the weights). The Adam step
# count comes from ``common.pt``.

_MAIN_PREFIXES = ("optimizer.state.param", "optimizer.state.fp32_param")  # distributed, plain mixed precision
_MOMENTS = ("exp_avg", "exp_avg_sq")
SWITCH_KEY = "optimizer_model_space"  # where the switch's tensors sit in the sharded state dict


def _optimizer_slots(optimizer) -> list[tuple]:
    """``(model parameter, main parameter, flat range or None, inner torch optimizer)`` for every
    parameter this rank's (chained) optimizer updates. The range is the part of the flattened
    parameter this rank's distributed optimizer owns; None: the plain optimizer holds all of it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    slots = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if isinstance(opt, DistributedOptimizer):
            for gbuf_range_maps in opt.gbuf_ranges:
                for buckets in gbuf_range_maps.values():
                    for bucket in buckets:
                        for model_param, ranges in bucket["param_map"].items():
                            group, order = opt.model_param_group_index_map[model_param]
                            slots.append((model_param, inner.param_groups[group]["params"][order],
                                          ranges["param"], inner))
        elif hasattr(opt, "float16_groups"):  # plain bf16: fp32 copies of the bf16 parameters
            for models, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                slots += [(p, main, None, inner) for p, main in zip(models, mains)]
            slots += [(p, p, None, inner) for group in opt.fp32_from_fp32_groups for p in group]
        else:  # plain fp32: the optimizer updates the parameters themselves
            slots += [(p, p, None, inner) for group in inner.param_groups for p in group["params"]]
    return slots


def _optimized_params(optimizer) -> list[tuple]:
    """``(model parameter, whether the optimizer keeps a separate main copy)`` for every parameter
    the optimizer covers on *any* data-parallel rank: a distributed optimizer's rank owns ranges of
    some parameters only, but a load must ask for every tensor once from its main replica."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    params = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            for buffer in opt.buffers:
                params.update((id(p), (p, True)) for p in buffer.param_index_map)
    for model_param, main, _, _ in _optimizer_slots(optimizer):
        params.setdefault(id(model_param), (model_param, main is not model_param))
    return list(params.values())


def switched_optimizer_request(run, model_sd: dict, path: str, meta: dict) -> dict:
    """The sharded state dict entries that load the other optimizer's Adam state in model space:
    ``{i: {"exp_avg": ShardedTensor, "exp_avg_sq": ..., ["main": ...]}}``, ``i`` indexing
    ``_optimized_params``. Fails naming the tensor and the setting when the checkpoint lacks one."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    saved = dist_checkpointing.load_tensors_metadata(path)
    tensors, _ = extract_sharded_tensors_and_factories(model_sd)
    by_param = {id(sh.data): sh for sh in nested_values(tensors)}
    was = str(bool(meta["layout"].get("distributed_optimizer"))).lower()
    request = {}
    for i, (model_param, has_main) in enumerate(_optimized_params(run.optimizer)):
        sh = by_param.get(id(model_param))
        if sh is None:
            raise CheckpointError(f"a parameter of shape {tuple(model_param.shape)} that the optimizer updates "
                                  f"is not in the model's sharded state dict: cannot place its Adam state")
        wanted = {name: f"optimizer.state.{name}" for name in _MOMENTS}
        if has_main:  # else the weights, loaded already, are the main parameters
            prefix = next((pre for pre in _MAIN_PREFIXES if f"{pre}.{sh.key}" in saved), None)
            if prefix is not None:  # else (a plain fp32 checkpoint) the weights are
                wanted["main"] = prefix
        entry = {}
        for name, prefix in wanted.items():
            key = f"{prefix}.{sh.key}"
            if key not in saved:
                raise CheckpointError(
                    f"checkpoint '{path}' was saved with parallel.distributed_optimizer={was} and has no "
                    f"optimizer tensor '{key}' (its optimizer state is not in the per-parameter layout a "
                    f"switch of parallel.distributed_optimizer needs): resume with "
                    f"--parallel.distributed_optimizer {was}, or start a new run from its weights alone")
            buf = torch.empty(model_param.shape, dtype=saved[key].dtype, device=model_param.device)
            entry[name] = make_sharded_optimizer_tensor(sh, buf, prefix)
        request[i] = entry
    return request


def _saved_adam_step(common) -> float:
    """The Adam step count in a loaded ``common.pt`` optimizer entry, plain (``common_step``) or
    distributed (each param group's ``step``), chained or not."""
    steps = set()

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "common_step":
                    steps.add(float(v))
                elif k == "param_groups" and isinstance(v, list):
                    steps.update(float(g["step"]) for g in v if isinstance(g, dict) and g.get("step") is not None)
                else:
                    walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(common)
    if len(steps) != 1:
        raise CheckpointError(f"the checkpoint's {COMMON} holds {'no' if not steps else 'several'} optimizer "
                              f"step counts ({sorted(steps)}): cannot restore the Adam state")
    return steps.pop()


def _rank_part(whole: torch.Tensor, main: torch.Tensor, rng) -> torch.Tensor:
    """This rank's part of a whole (TP/PP-local) parameter-shaped tensor, shaped like ``main``."""
    return whole.reshape(-1)[rng.start:rng.end] if rng is not None else whole.reshape(main.shape)


@torch.no_grad()
def load_switched_optimizer(optimizer, loaded: dict, common) -> None:
    """Place the model-space Adam state ``loaded`` (``switched_optimizer_request``'s entries, loaded)
    into this run's optimizer; call after the weights are loaded (a plain fp32 checkpoint's main
    parameters are its weights)."""
    step = _saved_adam_step(common)
    _init_adam_state(optimizer)
    index = {id(p): i for i, (p, _) in enumerate(_optimized_params(optimizer))}
    for model_param, main, rng, inner in _optimizer_slots(optimizer):
        got = loaded[index[id(model_param)]]
        if main is not model_param:
            main.copy_(_rank_part(got.get("main", model_param), main, rng))
        state = inner.state[main]
        for name in _MOMENTS:
            state[name].copy_(_rank_part(got[name], main, rng))
        if "step" in state:  # torch Adam: a step per parameter (distinct tensors: see _load_optimizer)
            state["step"] = torch.tensor(step, dtype=torch.float32)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt.optimizer, torch.optim.Adam):  # Apex / TE FusedAdam: the step per group
            for group in opt.optimizer.param_groups:
                group["step"] = int(step)
    use_fused_adam(optimizer)


def adopt_sample_count(cfg, meta: dict, log) -> None:
    """Keep the data order of a resumed run: megatron-core sizes (and so shuffles) the training set
    for the number of samples asked for, so a resume that asks for more (a larger train_steps or
    global batch) would reorder everything, repeating samples already trained on. The dataset is
    built with the checkpoint's count when that covers this run; otherwise it must grow, and we say so."""
    t = cfg.training
    saved = meta.get("train_samples")
    need = t.train_steps * t.global_batch_size
    if saved is None:
        return
    if t.train_samples is None and saved >= need:
        t.train_samples = saved
        return
    current = max(need, t.train_samples or 0)
    if current != saved:
        log(f"warning: the training set is built for {current} samples (training.train_samples / "
            f"training.train_steps x training.global_batch_size), the checkpoint's for {saved}: megatron-core "
            f"shuffles the data anew for the new count, so the data order from sample "
            f"{meta.get('consumed_samples')} on differs from the one trained so far (some samples repeat). "
            f"To let a run grow without this, start it with training.train_samples set to the most samples "
            f"it may ever train on")


# ----------------------------------------------------------------------------- the hooks

class Checkpointer:
    """The training loop's checkpoint hooks: ``maybe_resume()``, ``on_step_end(run)``, ``finish()``."""

    def __init__(self, run):
        self.run = run
        self.cfg = run.cfg.checkpoint
        self.last_saved: Optional[int] = None
        self._signalled = False
        self._old_handlers = {}
        self._async_queue = None
        self._pending: Optional[int] = None  # iteration of the async save in flight
        self.save_seconds = 0.0  # time the training loop spent in saves (blocking part only)
        self.staging: Optional[HostStaging] = None  # the host copies a save writes (host_staging.py)
        self._staging_reported = False
        self._host_group = None  # the preemption flag's group: gloo, a host-side exchange (_agree_on_signal)
        if self.cfg.save:
            check_writable(self.cfg.save)
            if dist.is_initialized() and dist.get_backend() != "gloo":  # every rank builds it at the same point
                self._host_group = dist.new_group(backend="gloo")
            for sig in PREEMPTION_SIGNALS:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self._signalled = True  # acted on at the next step end, when every rank agrees

    # -- resume

    def maybe_resume(self) -> None:
        path = self._find_resume_dir()
        if path is None:
            return
        meta = read_meta(path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"'{path}': format_version {meta.get('format_version')} is not "
                                  f"{FORMAT_VERSION} (this build's)")
        self._load(path, meta)
        self.last_saved = self.run.step

    def _find_resume_dir(self) -> Optional[str]:
        load = self.cfg.load
        if not load:
            return None
        fresh_ok = self._may_start_fresh(load)
        path, notes = (None, []) if fresh_ok and not os.path.isdir(load) else resolve_checkpoint(load)
        for note in notes:
            self.run.logger.print(note)
        if path is None and not fresh_ok:
            raise CheckpointError(f"checkpoint.load: '{load}' holds no complete checkpoint (no '{LATEST}' file)")
        if path is None:
            self.run.logger.print(f"no checkpoint in '{load}' yet: starting from scratch")
        return path

    def _may_start_fresh(self, load: str) -> bool:
        """Loading from the save directory itself is the resume-after-preemption setup: empty is fine."""
        return bool(self.cfg.save) and os.path.abspath(load) == os.path.abspath(self.cfg.save)

    def _load(self, path: str, meta: dict) -> None:
        run = self.run
        full = "optimizer" in meta["contents"]
        switched = full and optimizer_switched(meta, run)
        # The RNG states are per (pp, tp, dp) rank; which optimizer a run uses does not touch them.
        same_layout = _ranks(meta["layout"]) == _ranks(_layout(run))
        verify_files(path)
        frozen = [n for n in meta.get("frozen", []) if n in run.frozen_models]
        sharded = build_sharded_state_dict(run, is_loading=True, optimizer=full and not switched,
                                           rng=full and same_layout, frozen=frozen)
        check_shapes(sharded, path)
        if switched:
            model_sd = {k: v for k, v in sharded.items() if k.startswith("model")}
            sharded[SWITCH_KEY] = switched_optimizer_request(run, model_sd, path, meta)
        try:
            state = dist_checkpointing.load(sharded, path)
        except CheckpointError:
            raise
        except (Exception, _DCPError) as e:
            raise CheckpointError(f"loading checkpoint '{path}' failed: {type(e).__name__}: {e}") from e
        for i, chunk in enumerate(run.model):
            getattr(chunk, "module", chunk).load_state_dict(state[f"model{i}"], strict=True)
        for name in frozen:
            for i, chunk in enumerate(run.frozen_models[name]):
                loaded = {k[len(name) + 1:]: v for k, v in state[f"{name}{i}"].items()}  # drop "name."
                getattr(chunk, "module", chunk).load_state_dict(loaded, strict=True)
        if switched:
            load_switched_optimizer(run.optimizer, state[SWITCH_KEY], state.get("optimizer"))
        elif full:
            _load_optimizer(run.optimizer, state["optimizer"])
        if full:
            run.scheduler.override_opt_param_scheduler = True  # the schedule follows this run's config
            run.scheduler.load_state_dict(meta["scheduler"])
            run.step, run.consumed_samples = meta["iteration"], meta["consumed_samples"]
            if same_layout:
                _set_rng_state(state["rng_state"])
            adopt_sample_count(run.cfg, meta, run.logger.print)
        else:
            run.optimizer.reload_model_params()  # main (fp32) copies follow the loaded weights
        run.logger.print(f"resumed from '{path}': step {run.step}, {run.consumed_samples} samples consumed"
                         + ("" if same_layout else f" (resharded from {meta['layout']}; RNG states not restored)"))
        if switched:
            saved = "distributed" if meta["layout"]["distributed_optimizer"] else "plain"
            run.logger.print(f"the checkpoint holds the {saved} optimizer's state: Adam moments, main parameters "
                             f"and step loaded into this run's parallel.distributed_optimizer="
                             f"{str(run.cfg.parallel.distributed_optimizer).lower()} optimizer")

    # -- save

    def on_step_end(self, run) -> None:
        if not self.cfg.save:
            return
        self._poll_async()
        self.prepare_saves()
        preempt = self._agree_on_signal()
        if preempt or (self.cfg.save_interval and run.step % self.cfg.save_interval == 0):
            self.save(blocking=preempt)  # a preemption leaves no time for a save in the background
        if preempt:
            raise Preempted(f"preemption signal: saved step {run.step} to '{self.cfg.save}', stopping")

    def prepare_saves(self) -> None:
        """At the first step end, so that the first save finds them ready: start the writer helpers in
        the background and, with ``checkpoint.host_buffers_at: start`` (the optimizer state exists by
        then), size the host buffers from the state a save would write and reserve them in a background
        thread. Reports the buffers once they are ready."""
        guard_writer_processes(background=True)
        staging = self._host_staging()
        if staging is None:
            return
        if self.cfg.host_buffers_at == "start" and not staging.started:
            staging.reserve_in_background(staged_sizes(build_sharded_state_dict(self.run, is_loading=False)))
        if not self._staging_reported and staging.stats["segments"] and not staging.reserving:
            self._staging_reported = True
            self.run.logger.print(f"checkpoint host buffers ready: {staging.describe()}")

    def _host_staging(self) -> Optional[HostStaging]:
        if self.staging is None and self.cfg.host_buffers != "per_save":
            self.staging = HostStaging(pin=self.cfg.host_buffers == "pinned", device=self.run.info.device,
                                       log=self.run.logger.print)
        return self.staging

    def _agree_on_signal(self) -> bool:
        """Whether any rank was signalled: every rank saves this same step and stops. The flag is a CPU
        tensor reduced over a gloo group (the world group where that is gloo already), an exchange
        between hosts: with the flag on the GPU (NCCL) its read made the host wait, at every step end,
        for the optimizer's kernels before it could queue the next step."""
        flag = torch.tensor([1.0 if self._signalled else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._host_group)
        return bool(flag.item() > 0)

    def save(self, blocking: bool = False) -> str:
        """Save this step. Blocking: returns once the checkpoint is complete. Asynchronous
        (``checkpoint.async_save`` and not ``blocking``): returns once the state is handed to the
        writer; it is marked complete at the first step end after every rank's writer finished."""
        t0 = time.perf_counter()
        self.wait_for_pending_save()  # one save in flight at most
        run, root = self.run, self.cfg.save
        path = iter_dir(root, run.step)
        background = self.cfg.async_save and not blocking
        run.logger.print(f"saving checkpoint {path}" + (" (async)" if background else ""))
        guard_writer_processes()  # before megatron-core starts its own writer helpers
        try:
            if dist.get_rank() == 0:
                if os.path.exists(path):  # an interrupted earlier save of this same step
                    shutil.rmtree(path)
                os.makedirs(path)
            dist.barrier()
            sharded = build_sharded_state_dict(run, is_loading=False)
            # A blocking save runs the same request in this process (as megatron-core's own blocking
            # save does), so both kinds copy into the same host buffers.
            request = dist_checkpointing.save(sharded, path, async_sharded_save=True)
            staging = self._host_staging()
            if staging is not None and request.preload_fn is not None:
                request = request._replace(preload_fn=partial(staging.stage, request.async_fn_args[1]))
            request.add_finalize_fn(partial(self._mark_complete, path, run.step, self._meta(), t0))
            if background:
                seconds = _hook_seconds(SLOW_WRITE_ENV, run.step)
                if seconds is not None and request.async_fn is not None:
                    request = request._replace(async_fn=partial(_slow_write, seconds, request.async_fn))
                self._queue().schedule_async_request(request)
                self._pending = run.step
            else:
                try:
                    request.execute_sync()
                finally:
                    self._release_host_buffers()
        except (CheckpointError, Preempted):
            raise
        except (Exception, _DCPError) as e:
            raise CheckpointError(_describe_write_failure(path, root, e)) from e
        finally:
            self.save_seconds += time.perf_counter() - t0
        return path

    def _mark_complete(self, path: str, iteration: int, meta: dict, t0: float) -> None:
        seconds = _hook_seconds(SLOW_SAVE_ENV, iteration)
        if seconds is not None:
            print(f"test hook {SLOW_SAVE_ENV}: pausing the save of iteration {iteration}", flush=True)
            time.sleep(seconds)
        dist.barrier()  # every rank's shards are on disk (fsynced by the writers)
        if dist.get_rank() == 0:
            mark_complete(self.cfg.save, iteration, meta, self.cfg.keep_last)
        dist.barrier()
        self.last_saved = iteration
        self.run.logger.print(f"saved checkpoint {path} in {time.perf_counter() - t0:.1f}s")

    def _queue(self):
        if self._async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue(persistent=False)
        return self._async_queue

    def _poll_async(self) -> None:
        """Mark a finished async save complete (a collective: every rank calls it at each step end)."""
        if self._pending is None:
            return
        t0 = time.perf_counter()
        self._finalize(blocking=False)
        self.save_seconds += time.perf_counter() - t0

    def _finalize(self, blocking: bool) -> None:
        path = iter_dir(self.cfg.save, self._pending)
        try:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointError:
            raise
        except (Exception, _DCPError) as e:
            self._pending = None
            if self._async_queue.get_num_unfinalized_calls() == 0:  # the writer was joined
                self._release_host_buffers()
            raise CheckpointError(_describe_write_failure(path, self.cfg.save, e)) from e
        if self._async_queue.get_num_unfinalized_calls() == 0:
            self._pending = None
            self._release_host_buffers()

    def _release_host_buffers(self) -> None:
        """Only once no writer can still read the host buffers (it was joined, or never started)."""
        if self.staging is not None:
            self.staging.release()

    def wait_for_pending_save(self) -> None:
        """Block until an async save in flight is complete (``latest`` moved)."""
        if self._pending is not None:
            self._finalize(blocking=True)

    def _meta(self) -> dict:
        run = self.run
        t = run.cfg.training
        return {"format_version": FORMAT_VERSION, "iteration": run.step, "consumed_samples": run.consumed_samples,
                "train_samples": max(t.train_steps * t.global_batch_size, t.train_samples or 0),
                "contents": ["model", "optimizer", "rng"], "scheduler": run.scheduler.state_dict(),
                "layout": _layout(run), "config": to_dict(run.cfg), "stage": run.stage,
                "frozen": sorted(run.frozen_models)}

    def finish(self) -> None:
        self.wait_for_pending_save()
        if self.cfg.save and self.last_saved != self.run.step:
            self.save(blocking=True)
        self.close()

    def close(self) -> None:
        """Stop the writer helpers and restore the signal handlers (also after a failed run)."""
        if self._async_queue is not None:
            self._async_queue.close(abort=self._pending is not None)
            self._async_queue = None
        if self.staging is not None:
            self.staging.close()
        _stop_writer_manager()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
