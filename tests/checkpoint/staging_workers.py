"""Rank function of test_host_staging.py (module level: ``run_distributed`` pickles it by name)."""
from __future__ import annotations

import os
from functools import partial

import torch
from save_state_workers import _build, _checkpoint_bytes, _train


def _save(sd, path: str, staging=None, queue=None, before_write=None):
    """One save of ``sd`` to ``path``: megatron-core's own (no staging), or through ``staging``'s host
    buffers, run in this process (blocking) or by a forked writer (``queue``), ``before_write`` run
    in the training process once the writer has its copy and before it writes."""
    from megatron.core import dist_checkpointing

    from megatron_bluelm.training.checkpointing import _slow_write

    os.makedirs(path)
    if staging is None:
        dist_checkpointing.save(sd, path)
        return
    request = dist_checkpointing.save(sd, path, async_sharded_save=True)
    request = request._replace(preload_fn=partial(staging.stage, request.async_fn_args[1]))
    if queue is None:
        request.execute_sync()
    else:
        request = request._replace(async_fn=partial(_slow_write, 1.0, request.async_fn))
        queue.schedule_async_request(request)
        before_write()
        queue.maybe_finalize_async_calls(blocking=True)
    staging.release()


def staged_saves(out: str) -> dict:
    """One training step, then the same state saved by megatron-core's own path, through host buffers
    reserved from ``staged_sizes`` (blocking), and again (async, the weights changed in place while
    the writer waits): the shard files of all three, the buffers' addresses and growth."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training.checkpointing import build_sharded_state_dict
    from megatron_bluelm.training.host_staging import HostStaging, staged_sizes

    run = _build(1, out)
    staging = HostStaging(pin=True, device=run.info.device, log=print, threads=2)
    queue = AsyncCallsQueue(persistent=False)
    try:
        _train(run, 1)
        sd = build_sharded_state_dict(run, is_loading=False, rng=False)
        _save(sd, f"{out}/mcore")
        staging.reserve_in_background(staged_sizes(build_sharded_state_dict(run, is_loading=False, rng=False)))
        staging.wait()
        reserved = dict(staging.stats)
        addrs = [s.addr for s in staging._segments]
        _save(build_sharded_state_dict(run, is_loading=False, rng=False), f"{out}/staged", staging)
        busy = None
        staging._busy = True
        try:
            staging.stage([])
        except RuntimeError as e:
            busy = str(e)
        staging.release()

        def train_on():  # what the next optimizer steps do to the saved tensors while the writer writes
            with torch.no_grad():
                for chunk in run.model:
                    for p in chunk.parameters():
                        p.add_(1.0)
                for opt in getattr(run.optimizer, "chained_optimizers", [run.optimizer]):
                    for state in opt.optimizer.state.values():
                        for v in state.values():
                            if torch.is_tensor(v) and v.dim() > 0:
                                v.add_(1.0)

        _save(build_sharded_state_dict(run, is_loading=False, rng=False), f"{out}/async", staging, queue, train_on)
        files = {name: _checkpoint_bytes(f"{out}/{name}") for name in ("mcore", "staged", "async")}
        return {"files": {k: sorted(v) for k, v in files.items()},
                "staged_same": files["staged"] == files["mcore"], "async_same": files["async"] == files["mcore"],
                "reserved": reserved, "stats": dict(staging.stats), "busy_error": busy,
                "same_segments": addrs == [s.addr for s in staging._segments]}
    finally:
        queue.close()
        staging.close()
        teardown()
