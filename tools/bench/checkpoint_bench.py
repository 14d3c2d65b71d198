"""Checkpoint and NaN-check costs of a training run, measured in one process on one device.

    python tools/bench/checkpoint_bench.py --preset bluelm-2.5-3b --seq 4096 --save-dir /tmp/ckpt_bench  # 1 GPU
    python tools/bench/checkpoint_bench.py --preset tiny --seq 64 --steps 4 --window 6                     # CPU
    # the save costs alone, first vs later async saves, megatron-core's own host copy last (1 GPU):
    python tools/bench/checkpoint_bench.py --preset bluelm-2.5-3b --seq 4096 --save-dir /tmp/ckpt_bench \
        --no-nan-check --no-warmup-save --modes blocking,async,async,async:per_save

The full decoder (embedding, all layers, output layer) with its distributed-optimizer Adam state is
trained on random tokens through the real training step (megatron-core schedule, DDP buffers) and
saved through the real ``Checkpointer`` (megatron-core dist_checkpointing, torch_dist format).

* Step time: the median over ``--steps`` steps with our NaN/inf gradient check (the default) and with
  it removed, with clipping on (the check reuses the clip norm) and off (the check computes the norm).
* Seconds of training lost per save: a window of steps with one save issued at its start, minus the
  same number of steps without a save. Blocking: the save returns once the checkpoint is complete.
  Async (``checkpoint.async_save``): the save returns once the state is in host memory and the writer
  process is forked; the window then polls at every step end (as training does) and runs until the
  writer has finished (at least ``--window`` steps, at most ``--max-window``; a writer still running
  then is waited for, and that wait is counted as lost too). Each save is reported on its own (``async
  #1``, ``async #2``: the first and a later async save), with the seconds its call blocked.
* Host buffers (``checkpoint.host_buffers``, training/host_staging.py): with ``--host-buffers-at start``
  (the default, as in training) they are reserved in a background thread before the saves while
  training steps run; the step times during that reservation are reported against the base step. A
  mode ``async:per_save`` / ``blocking:per_save`` saves through megatron-core's own host copy instead
  (fresh pinned blocks from PyTorch's caching host allocator; the run's buffers are released first).
Each figure is printed as soon as it is measured, line-buffered even into a pipe or file, and --out's
JSON is rewritten after each measurement: a run stopped early keeps everything measured so far.
(Piping through ``grep`` needs ``grep --line-buffered`` for the same.)
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shutil
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from megatron_bluelm.config.loader import load_config  # noqa: E402

_MAIN_PID = os.getpid()


def _sync():
    # Never in a forked checkpoint writer: a wrapped phase may run there, and CUDA cannot be used
    # (nor re-initialized) in a forked child; the writer's failure would fail the save.
    if torch.cuda.is_available() and os.getpid() == _MAIN_PID:
        torch.cuda.synchronize()


def random_batches(vocab: int, mbs: int, seq: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (mbs, seq + 1), generator=gen)
        yield {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(mbs, seq),
               "position_ids": torch.arange(seq).expand(mbs, seq).contiguous(), "attention_mask": None}


def build_run(args):
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.training.loop import prepare_config, setup_run

    overrides = ["--model.preset", args.preset, "--model.vocab_size", str(args.vocab), "--data.seq_length",
                 str(args.seq), "--data.mock", "true", "--training.micro_batch_size", str(args.mbs),
                 "--training.global_batch_size", str(args.mbs * args.microbatches), "--training.recompute",
                 args.recompute, "--parallel.distributed_optimizer", "true", "--training.train_steps", "100000",
                 "--schedule.warmup_steps", "1", "--logging.tensorboard", "false", "--logging.output_dir",
                 os.path.join(args.save_dir, "log"), "--checkpoint.save", os.path.join(args.save_dir, "save"),
                 "--checkpoint.keep_last", "1", "--checkpoint.host_buffers", args.host_buffers,
                 "--checkpoint.host_buffers_at", args.host_buffers_at] + list(getattr(args, "model_overrides", []))
    cfg = load_config(None, overrides)
    prepare_config(cfg)
    return setup_run(cfg, lambda **kw: build_decoder(cfg, args.vocab, **kw), flops_per_token=0.0)


def make_step(run, args):
    from megatron_bluelm.training.step import train_step

    data = [random_batches(args.vocab, args.mbs, args.seq)]

    def step():
        res = train_step(run.model, run.optimizer, run.scheduler, data, num_microbatches=args.microbatches,
                         seq_length=args.seq, micro_batch_size=args.mbs, device=run.info.device)
        run.step += 1
        return res

    return step


def median_step(step, n: int) -> float:
    times = []
    for _ in range(n):
        _sync()
        t0 = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def set_nan_check(optimizer, on: bool, saved: dict) -> None:
    """Our check lives in instance attributes over megatron-core's methods (model_setup.skip_nonfinite_steps):
    removing them restores megatron-core's own, putting them back restores the check."""
    names = ("get_grad_norm", "clip_grad_norm", "step_with_ready_grads")
    if not saved:
        saved.update({n: optimizer.__dict__[n] for n in names if n in optimizer.__dict__})
    for n in names:
        if on and n in saved:
            setattr(optimizer, n, saved[n])
        elif not on:
            optimizer.__dict__.pop(n, None)


def set_clip(optimizer, clip: float) -> None:
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt.config.clip_grad = clip
    optimizer.config.clip_grad = clip


# The save call's phases, in call order: (label, owner, attribute). Nested phases (the validation
# inside the preprocessing, the write-data preparation inside the planning) are reported exclusive
# of their children, so the rows add up to the save call.
SAVE_PHASES = (
    ("writer helpers (Manager start)", "megatron_bluelm.training.checkpointing", "guard_writer_processes"),
    ("state dict: param all-gather", "megatron_bluelm.training.checkpointing", "finish_param_gather"),
    ("state dict: model", "megatron_bluelm.training.checkpointing", "model_sharded_state_dict"),
    ("state dict: optimizer", "megatron.core.optimizer.optimizer.ChainedOptimizer", "sharded_state_dict"),
    ("state dict: optimizer (distributed)", "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer",
     "sharded_state_dict"),
    ("  of which: DP gather to host", "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer",
     "get_parameter_state_dp_zero"),  # megatron-core's host round trip: a save no longer calls it
    ("  of which: state on device (ours)", "megatron_bluelm.training.optimizer_state",
     "fully_reshardable_save_state"),
    ("preprocess (factories)", "megatron.core.dist_checkpointing.serialization", "save_preprocess"),
    ("validate: metadata exchange", "megatron.core.dist_checkpointing.state_dict_utils",
     "determine_global_metadata"),
    ("validate: integrity check", "megatron.core.dist_checkpointing.state_dict_utils",
     "validate_sharding_integrity"),
    ("common.pt", "megatron.core.dist_checkpointing.strategies.common.TorchCommonSaveStrategy", "save_common"),
    ("to torch ShardedTensors", "megatron.core.dist_checkpointing.strategies.torch", "mcore_to_pyt_state_dict"),
    ("plan (local + global)", "megatron.core.dist_checkpointing.strategies.torch", "save_state_dict_async_plan"),
    ("write buckets (CPU clones)", "megatron.core.dist_checkpointing.strategies.filesystem_async."
     "FileSystemWriterAsync", "prepare_write_data"),
    ("D2H copy (preload)", "megatron.core.dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync",
     "preload_tensors"),  # megatron-core's own host copy (host_buffers per_save)
    ("D2H copy into host buffers (ours)", "megatron_bluelm.training.host_staging.HostStaging", "stage"),
    ("  of which: allocate host buffers", "megatron_bluelm.training.host_staging.HostStaging", "reserve"),
    ("barriers", "torch.distributed", "barrier"),
    ("fork writer", "megatron.core.dist_checkpointing.strategies.async_utils.TemporalAsyncCaller",
     "schedule_async_call"),
    ("write + fsync (blocking)", "megatron.core.dist_checkpointing.strategies.filesystem_async."
     "FileSystemWriterAsync", "write_preloaded_data_multiproc"),
)


def _resolve(dotted: str):
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


@contextlib.contextmanager
def save_phase_timers(phases=SAVE_PHASES):
    """Wrap each phase's function with a timer for the duration of the block; yields the dict of
    exclusive seconds per label (a phase's time minus that of the phases called inside it). A
    function megatron-core does not have (another version) is reported missing, not guessed."""
    seconds = {label: 0.0 for label, _, _ in phases}
    stack: list = []
    restore = []

    def timed(label, fn):
        def wrapper(*a, **kw):
            _sync()
            stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                _sync()
                total = time.perf_counter() - t0
                inner = stack.pop()
                seconds[label] += total - inner
                if stack:
                    stack[-1] += total
        return wrapper

    try:
        for label, owner, attr in phases:
            try:
                obj = _resolve(owner)
            except (ImportError, AttributeError):
                obj = None
            raw = None if obj is None else inspect.getattr_static(obj, attr, None)
            if raw is None:
                seconds[label] = float("nan")
                continue
            fn = getattr(obj, attr)
            wrapped = timed(label, fn)
            setattr(obj, attr, staticmethod(wrapped) if isinstance(raw, staticmethod) else wrapped)
            restore.append((obj, attr, raw))
        yield seconds
    finally:
        for obj, attr, raw in reversed(restore):
            setattr(obj, attr, raw)


def print_phases(mode: str, seconds: dict, call_s: float) -> None:
    print(f"\n{mode} save call: {call_s:.2f} s, by phase (exclusive seconds)", flush=True)
    shown = 0.0
    for label, s in seconds.items():
        if s != s:  # NaN: not in this megatron-core
            print(f"  {label:<32} (not found in this megatron-core)", flush=True)
        elif s > 0:
            print(f"  {label:<32} {s:8.3f}", flush=True)
            shown += s
    print(f"  {'other (ours: mkdir, meta, queue)':<32} {call_s - shown:8.3f}", flush=True)


def use_host_buffers(checkpointer, mode: str) -> None:
    """Save through the run's own host buffers (pinned | pageable) or megatron-core's per-save copy;
    leaving the run's buffers releases them first (both would hold ~the checkpoint's size)."""
    if mode == checkpointer.cfg.host_buffers:
        return
    if checkpointer.staging is not None:
        checkpointer.staging.close()
        checkpointer.staging = None
    checkpointer.cfg.host_buffers = mode


def save_window(run, step, checkpointer, args, mode: str, label: str, base_step_s: float) -> dict:
    async_save, _, host_buffers = mode.partition(":")
    async_save = async_save == "async"
    use_host_buffers(checkpointer, host_buffers or args.host_buffers)
    checkpointer.cfg.async_save = async_save
    _sync()
    with save_phase_timers() as phases:
        t0 = time.perf_counter()
        checkpointer.save()
        _sync()
        call_s = time.perf_counter() - t0
    print_phases(f"{label} ({checkpointer.cfg.host_buffers} host buffers)", phases, call_s)
    writer_done_at, steps = None, 0
    while steps < args.window or (checkpointer._pending is not None and steps < args.max_window):
        step()
        steps += 1
        checkpointer._poll_async()
        if writer_done_at is None and checkpointer._pending is None:
            writer_done_at = steps
    t_wait = time.perf_counter()
    checkpointer.wait_for_pending_save()
    wait_s = time.perf_counter() - t_wait
    if writer_done_at is None and async_save:
        writer_done_at = f">{steps}"
    _sync()
    total = time.perf_counter() - t0
    lost = total - steps * base_step_s
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(checkpointer.cfg.save) for f in fs)
    shutil.rmtree(checkpointer.cfg.save)  # one on disk at a time: bf16 weights + fp32 main + 2 moments = 14 B/param
    os.makedirs(checkpointer.cfg.save)
    return {"mode": "async" if async_save else "blocking", "label": label,
            "host_buffers": checkpointer.cfg.host_buffers, "save_call_s": call_s, "final_wait_s": wait_s,
            "steps": steps, "window_s": total, "lost_s": lost,
            "writer_done_after_steps": writer_done_at if async_save else 0,
            "checkpoint_gib": size / 2**30, "phases_s": dict(phases)}


def reserve_host_buffers(checkpointer, step, base_step_s: float, results: dict) -> None:
    """What training does at its first step end (``Checkpointer.prepare_saves``): start the writer
    helpers and (``host_buffers_at: start``) reserve the host buffers, both in the background, with
    training steps running meanwhile: how long each takes, and what they do to the step time."""
    from megatron_bluelm.training.checkpointing import writer_helpers_starting

    t0 = time.perf_counter()
    checkpointer.prepare_saves()  # sizes the buffers (in this thread), starts the background threads
    sizing_s = time.perf_counter() - t0
    staging = checkpointer.staging if checkpointer.cfg.host_buffers_at == "start" else None
    times, ready = [], {}
    while (staging is not None and staging.reserving) or writer_helpers_starting():
        _sync()
        t = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t)
        busy = {"buffers": staging is not None and staging.reserving, "helpers": writer_helpers_starting()}
        for name in (n for n, b in busy.items() if not b):
            ready.setdefault(name, time.perf_counter() - t0)
    if staging is not None:
        staging.wait()
        checkpointer.prepare_saves()  # prints the buffers' report
    r = {"sizing_s": sizing_s, "buffers_ready_s": ready.get("buffers", sizing_s) if staging else None,
         "helpers_ready_s": ready.get("helpers", sizing_s), "steps_during": len(times),
         "step_median_s": statistics.median(times) if times else None, "step_max_s": max(times, default=None),
         "stats": dict(staging.stats) if staging else None, "pin_errors": staging.pin_errors[:3] if staging else []}
    results["background_preparation"] = r
    buffers = (f"host buffers ready after {r['buffers_ready_s']:.2f} s ({staging.describe()}; sizing "
               f"{sizing_s:.2f} s in the training thread)" if staging else "no host buffers reserved")
    during = (f"{len(times)} steps ran meanwhile: median {r['step_median_s']:.4f} s, max {r['step_max_s']:.4f} s "
              f"(base {base_step_s:.4f} s)" if times else "no step ran meanwhile")
    print(f"RESULT background preparation: {buffers}; writer helpers ready after {r['helpers_ready_s']:.2f} s; "
          f"{during}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bluelm-2.5-3b")
    ap.add_argument("--vocab", type=int, default=100_000)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--recompute", default="none")
    ap.add_argument("--steps", type=int, default=10, help="steps per step-time measurement (after 3 warm-up)")
    ap.add_argument("--window", type=int, default=30, help="steps after each save at least (more until its writer "
                    "has finished)")
    ap.add_argument("--max-window", type=int, default=3000, help="steps after a save at most (then the run waits "
                    "for the writer)")
    ap.add_argument("--save-dir", default="outputs/checkpoint_bench", help="scratch directory (emptied)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--modes", default="blocking,async,async",
                    help="the measured saves in order, comma-separated: blocking | async, optionally :pinned | "
                         ":pageable | :per_save for the host buffers of that save (default --host-buffers; e.g. "
                         "blocking,async,async,async:per_save)")
    ap.add_argument("--host-buffers", default="pinned", choices=("pinned", "pageable", "per_save"),
                    help="checkpoint.host_buffers")
    ap.add_argument("--host-buffers-at", default="start", choices=("start", "first_save"),
                    help="checkpoint.host_buffers_at: start reserves them in the background before the saves")
    ap.add_argument("--no-warmup-save", action="store_true",
                    help="skip the untimed blocking save before the measured ones")
    ap.add_argument("--no-nan-check", action="store_true", help="skip the NaN/inf-check step-time measurement")
    args, model_overrides = ap.parse_known_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # figures reach a pipe / log file as they are printed
    bad = [a for a in model_overrides if a.startswith("--") and not a.startswith("--model.")]
    if bad:
        ap.error(f"unknown arguments {bad} (config overrides other than --model.* are set by the benchmark)")
    args.model_overrides = model_overrides
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    kinds = [m.partition(":") for m in args.modes]
    if not args.modes or any(k not in ("blocking", "async") or b not in ("", "pinned", "pageable", "per_save")
                             for k, _, b in kinds):
        ap.error(f"--modes: expected a comma-separated list of blocking | async, each optionally with "
                 f":pinned | :pageable | :per_save, got {args.modes}")
    if args.preset == "tiny" and args.vocab == 100_000:
        args.vocab = 8192
    shutil.rmtree(args.save_dir, ignore_errors=True)
    os.makedirs(os.path.join(args.save_dir, "save"))
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training.checkpointing import Checkpointer

    run = build_run(args)
    step = make_step(run, args)
    checkpointer = Checkpointer(run)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    params = sum(p.numel() for chunk in run.model for p in chunk.parameters())
    print(f"{args.preset}: {params / 1e9:.3f}B parameters, seq {args.seq} x {args.mbs * args.microbatches} "
          f"sequences per step, {device}, optimizer {type(run.optimizer).__name__}")
    nan_steps = 0 if args.no_nan_check else 8 * args.steps
    print(f"plan: 3 warm-up steps, {nan_steps} NaN-check steps, {args.steps} base steps, "
          f"{'host buffers reserved in the background, ' if args.host_buffers_at == 'start' else ''}"
          f"{'' if args.no_warmup_save else '1 warm-up save, '}{len(args.modes)} measured saves "
          f"({', '.join(args.modes)}) with {args.window}..{args.max_window} steps each (until the writer is done)")
    results = {"args": vars(args), "device": device, "params": params, "nan_check": [], "saves": []}
    try:
        median_step(step, 3)  # warm-up
        torch.distributed.barrier()  # the first collective sets up its communicator: not a save's cost
        measure_nan_check(run, step, args, results)
        set_clip(run.optimizer, 1.0)
        base = results["step_s"] = median_step(step, args.steps)
        print(f"\nbase step {base:.4f} s (median of {args.steps})", flush=True)
        reserve_host_buffers(checkpointer, step, base, results)
        write_json(args.out, results)
        if not args.no_warmup_save:  # megatron-core's writer helpers start on the first save
            checkpointer.save(blocking=True)
            shutil.rmtree(checkpointer.cfg.save)
            os.makedirs(checkpointer.cfg.save)
        print(f"\nSaves of the full model + optimizer state, step {base:.4f} s, window {args.window}.."
              f"{args.max_window} steps", flush=True)
        count: dict = {}
        for mode in args.modes:
            kind = mode.partition(":")[0]
            count[kind] = count.get(kind, 0) + 1
            s = save_window(run, step, checkpointer, args, mode, f"{kind} #{count[kind]}", base_step_s=base)
            results["saves"].append(s)
            print(f"RESULT save {s['label']:>11} ({s['host_buffers']} host buffers): {s['checkpoint_gib']:.2f} GiB, "
                  f"save call blocked {s['save_call_s']:.2f} s, training lost {s['lost_s']:.2f} s over "
                  f"{s['steps']} steps (final wait {s['final_wait_s']:.2f} s), writer done after "
                  f"{s['writer_done_after_steps']} steps", flush=True)
            write_json(args.out, results)
    finally:
        checkpointer.close()
        teardown()
    print_summary(results)


def print_summary(results: dict) -> None:
    saves = results["saves"]
    if not saves:
        return
    print(f"\n{'save':>11} {'host buffers':>12} {'call blocked s':>14} {'training lost s':>15} {'steps':>6}")
    for s in saves:
        print(f"{s['label']:>11} {s['host_buffers']:>12} {s['save_call_s']:14.2f} {s['lost_s']:15.2f} {s['steps']:6d}")
    blocking = [s for s in saves if s["mode"] == "blocking"]
    for s in (s for s in saves if s["mode"] == "async"):
        if blocking:
            b = blocking[-1]
            print(f"RESULT {s['label']} ({s['host_buffers']}) lost {s['lost_s']:.2f} s vs {b['lost_s']:.2f} s "
                  f"for {b['label']}: {b['lost_s'] - s['lost_s']:.2f} s of training saved")


def measure_nan_check(run, step, args, results: dict) -> None:
    """Median step time with our NaN/inf gradient check and without it, clipping on and off."""
    if args.no_nan_check:
        return
    print("\nNaN/inf gradient check (median step time)", flush=True)
    saved: dict = {}
    for clip in (1.0, 0.0):
        set_clip(run.optimizer, clip)
        with_check, without = [], []
        for _ in range(2):  # interleaved, so a drifting clock (thermals, neighbours) hits both alike
            with_check.append(median_step(step, args.steps))
            set_nan_check(run.optimizer, False, saved)
            without.append(median_step(step, args.steps))
            set_nan_check(run.optimizer, True, saved)
        with_check, without = min(with_check), min(without)
        r = {"clip_grad": clip, "step_s_with_check": with_check, "step_s_without": without,
             "check_ms": (with_check - without) * 1e3, "check_pct": 100 * (with_check - without) / without}
        results["nan_check"].append(r)
        print(f"RESULT nan check clip_grad {clip}: step {with_check:.4f} s with, {without:.4f} s without, "
              f"cost {r['check_ms']:.2f} ms ({r['check_pct']:.2f} %)", flush=True)
        write_json(args.out, results)


def write_json(path, results: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
