"""Checkpoint and NaN-check costs of a training run, measured in one process on one device.

    python tools/bench/checkpoint_bench.py --preset bluelm-2.5-3b --seq 4096 --save-dir /tmp/ckpt_bench  # 1 GPU
    python tools/bench/checkpoint_bench.py --preset tiny --seq 64 --steps 4 --window 6                     # CPU

The full decoder (embedding, all layers, output layer) with its distributed-optimizer Adam state is
trained on random tokens through the real training step (megatron-core schedule, DDP buffers) and
saved through the real ``Checkpointer`` (megatron-core dist_checkpointing, torch_dist format).

* Step time: the median over ``--steps`` steps with our NaN/inf gradient check (the default) and with
  it removed, with clipping on (the check reuses the clip norm) and off (the check computes the norm).
* Seconds of training lost per save: a window of ``--window`` steps with one save issued at its start,
  minus the same number of steps without a save. Blocking: the save returns once the checkpoint is
  complete. Async (``checkpoint.async_save``): the save returns once the state is on the host and the
  writer process is forked; the window then polls at every step end (as training does) and, if the
  writer has not finished by the window's end, waits for it (that wait is counted as lost too).
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
                 "--checkpoint.keep_last", "1"] + list(getattr(args, "model_overrides", []))
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
    ("plan (local + global)", "megatron.core.dist_checkpointing.strategies.torch", "save_state_dict_async_plan"),
    ("write buckets (CPU clones)", "megatron.core.dist_checkpointing.strategies.filesystem_async."
     "FileSystemWriterAsync", "prepare_write_data"),
    ("D2H copy (preload)", "megatron.core.dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync",
     "preload_tensors"),
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
    print(f"  {'other (ours: mkdir, barriers)':<32} {call_s - shown:8.3f}", flush=True)


def save_window(run, step, checkpointer, args, async_save: bool, base_step_s: float) -> dict:
    checkpointer.cfg.async_save = async_save
    _sync()
    with save_phase_timers() as phases:
        t0 = time.perf_counter()
        checkpointer.save()
        _sync()
        call_s = time.perf_counter() - t0
    print_phases("async" if async_save else "blocking", phases, call_s)
    writer_done_at = None
    for i in range(args.window):
        step()
        checkpointer._poll_async()
        if writer_done_at is None and checkpointer._pending is None:
            writer_done_at = i + 1
    t_wait = time.perf_counter()
    checkpointer.wait_for_pending_save()
    wait_s = time.perf_counter() - t_wait
    if writer_done_at is None and async_save:
        writer_done_at = f">{args.window}"
    _sync()
    total = time.perf_counter() - t0
    lost = total - args.window * base_step_s
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(checkpointer.cfg.save) for f in fs)
    shutil.rmtree(checkpointer.cfg.save)  # one on disk at a time: bf16 weights + fp32 main + 2 moments = 14 B/param
    os.makedirs(checkpointer.cfg.save)
    return {"mode": "async" if async_save else "blocking", "save_call_s": call_s, "final_wait_s": wait_s,
            "window_s": total, "lost_s": lost, "writer_done_after_steps": writer_done_at if async_save else 0,
            "checkpoint_gib": size / 2**30, "phases_s": dict(phases)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bluelm-2.5-3b")
    ap.add_argument("--vocab", type=int, default=100_000)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--recompute", default="none")
    ap.add_argument("--steps", type=int, default=10, help="steps per step-time measurement (after 3 warm-up)")
    ap.add_argument("--window", type=int, default=60, help="steps after each save (long enough for the writer)")
    ap.add_argument("--save-dir", default="outputs/checkpoint_bench", help="scratch directory (emptied)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--modes", default="blocking,async",
                    help="the measured saves in order, comma-separated: blocking | async (e.g. async,async: the "
                         "second shows a save after the first, with its host buffers and plan reused)")
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
    if not args.modes or any(m not in ("blocking", "async") for m in args.modes):
        ap.error(f"--modes: expected a comma-separated list of blocking | async, got {args.modes}")
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
    print(f"plan: 3 warm-up steps, {nan_steps} NaN-check steps, {'' if args.no_warmup_save else '1 warm-up save, '}"
          f"{args.steps} base steps, {len(args.modes)} measured saves ({', '.join(args.modes)}) with "
          f"{args.window} steps each")
    results = {"args": vars(args), "device": device, "params": params, "nan_check": [], "saves": []}
    try:
        median_step(step, 3)  # warm-up
        measure_nan_check(run, step, args, results)
        set_clip(run.optimizer, 1.0)
        if not args.no_warmup_save:  # megatron-core's writer helpers start on the first save
            checkpointer.save(blocking=True)
            shutil.rmtree(checkpointer.cfg.save)
            os.makedirs(checkpointer.cfg.save)
        base = results["step_s"] = median_step(step, args.steps)
        print(f"\nSaves of the full model + optimizer state, step {base:.4f} s, window {args.window} steps", flush=True)
        for mode in args.modes:
            s = save_window(run, step, checkpointer, args, async_save=mode == "async", base_step_s=base)
            results["saves"].append(s)
            print(f"RESULT save {s['mode']:>8}: {s['checkpoint_gib']:.2f} GiB, save call {s['save_call_s']:.2f} s, "
                  f"final wait {s['final_wait_s']:.2f} s, lost {s['lost_s']:.2f} s, writer done after "
                  f"{s['writer_done_after_steps']} steps", flush=True)
            write_json(args.out, results)
    finally:
        checkpointer.close()
        teardown()

    lost = {s["mode"]: s["lost_s"] for s in results["saves"]}  # the last save of each mode: steady state
    if len(lost) == 2:
        print(f"RESULT async saves {lost['blocking'] - lost['async']:.2f} s of training per save over blocking")


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
