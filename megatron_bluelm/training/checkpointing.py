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
for the distributed optimizer). RNG states are per rank and restored only into the same layout.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.loader import to_dict
from megatron_bluelm.training.model_setup import use_fused_adam

FORMAT_VERSION = 1
META = "meta.json"
LATEST = "latest"
ITER_RE = re.compile(r"^iter_(\d{7})$")
# Test hook only (tests/checkpoint/test_crash.py): "ITER:SECONDS" sleeps that long in the save of
# iteration ITER, after the tensors are written and before the checkpoint is marked complete, so the
# test can kill -9 the run in the middle of a save. Unset in normal runs.
SLOW_SAVE_ENV = "MEGATRON_BLUELM_TEST_SLOW_SAVE"
# The distributed optimizer's format whose tensors are per *model* parameter: reshardable over TP/PP/DP.
SHARDED_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                    "singleton_local_shards": False, "chained_optim_avoid_prefix": True}
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class CheckpointError(ConfigError):
    """A checkpoint directory is missing, incomplete, or does not fit the configured model."""


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
    with open(os.path.join(path, META)) as f:
        return json.load(f)


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


# ----------------------------------------------------------------------------- state

def _layout(run) -> dict:
    return {"tp": run.info.tp, "pp": run.info.pp, "dp": run.info.dp, "vpp": run.cfg.parallel.vpp,
            "world_size": run.info.world_size, "distributed_optimizer": run.cfg.parallel.distributed_optimizer}


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


def build_sharded_state_dict(run, *, is_loading: bool, optimizer: bool = True, rng: bool = True) -> dict:
    sd = model_sharded_state_dict(run.model)
    if optimizer:
        if is_loading:
            _init_adam_state(run.optimizer)
        sd["optimizer"] = run.optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=SHARDED_METADATA)
    if rng:
        sd["rng_state"] = _rng_object(_rng_state())
    return sd


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


def _test_delay(iteration: int) -> None:
    spec = os.environ.get(SLOW_SAVE_ENV)
    if spec:
        at, seconds = spec.split(":")
        if int(at) == iteration:
            print(f"test hook {SLOW_SAVE_ENV}: pausing the save of iteration {iteration}", flush=True)
            time.sleep(float(seconds))


def _stop_writer_manager() -> None:
    """megatron-core's torch_dist writer starts a multiprocessing Manager process (for its results
    queue) on the first save and never stops it; seen outliving our process. Stop it when we are done."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = filesystem_async._results_queue
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()
        filesystem_async._results_queue = None


# ----------------------------------------------------------------------------- the hooks

class Checkpointer:
    """The training loop's checkpoint hooks: ``maybe_resume()``, ``on_step_end(run)``, ``finish()``."""

    def __init__(self, run):
        self.run = run
        self.cfg = run.cfg.checkpoint
        self.last_saved: Optional[int] = None
        self._signalled = False
        self._old_handlers = {}
        if self.cfg.save:
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
        same_layout = meta["layout"] == _layout(run)
        sharded = build_sharded_state_dict(run, is_loading=True, optimizer=full, rng=full and same_layout)
        check_shapes(sharded, path)
        state = dist_checkpointing.load(sharded, path)
        for i, chunk in enumerate(run.model):
            getattr(chunk, "module", chunk).load_state_dict(state[f"model{i}"], strict=True)
        if full:
            _load_optimizer(run.optimizer, state["optimizer"])
            run.scheduler.override_opt_param_scheduler = True  # the schedule follows this run's config
            run.scheduler.load_state_dict(meta["scheduler"])
            run.step, run.consumed_samples = meta["iteration"], meta["consumed_samples"]
            if same_layout:
                _set_rng_state(state["rng_state"])
        else:
            run.optimizer.reload_model_params()  # main (fp32) copies follow the loaded weights
        run.logger.print(f"resumed from '{path}': step {run.step}, {run.consumed_samples} samples consumed"
                         + ("" if same_layout else f" (resharded from {meta['layout']}; RNG states not restored)"))

    # -- save

    def on_step_end(self, run) -> None:
        if not self.cfg.save:
            return
        preempt = self._agree_on_signal()
        if preempt or (self.cfg.save_interval and run.step % self.cfg.save_interval == 0):
            self.save()
        if preempt:
            raise Preempted(f"preemption signal: saved step {run.step} to '{self.cfg.save}', stopping")

    def _agree_on_signal(self) -> bool:
        flag = torch.tensor([1.0 if self._signalled else 0.0], device=self.run.info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def save(self) -> str:
        run, root = self.run, self.cfg.save
        path = iter_dir(root, run.step)
        run.logger.print(f"saving checkpoint {path}")
        t0 = time.perf_counter()
        if dist.get_rank() == 0:
            if os.path.exists(path):  # an interrupted earlier save of this same step
                shutil.rmtree(path)
            os.makedirs(path)
        dist.barrier()
        dist_checkpointing.save(build_sharded_state_dict(run, is_loading=False), path)
        _test_delay(run.step)
        dist.barrier()  # every rank's shards are on disk
        if dist.get_rank() == 0:
            mark_complete(root, run.step, self._meta(), self.cfg.keep_last)
        dist.barrier()
        self.last_saved = run.step
        run.logger.print(f"saved checkpoint {path} in {time.perf_counter() - t0:.1f}s")
        return path

    def _meta(self) -> dict:
        run = self.run
        return {"format_version": FORMAT_VERSION, "iteration": run.step, "consumed_samples": run.consumed_samples,
                "contents": ["model", "optimizer", "rng"], "scheduler": run.scheduler.state_dict(),
                "layout": _layout(run), "config": to_dict(run.cfg)}

    def finish(self) -> None:
        if self.cfg.save and self.last_saved != self.run.step:
            self.save()
        _stop_writer_manager()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
