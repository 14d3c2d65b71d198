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
Prints a table last; --out writes JSON.
"""
from __future__ import annotations

import argparse
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


def _sync():
    if torch.cuda.is_available():
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
                 "--checkpoint.keep_last", "1"]
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


def save_window(run, step, checkpointer, args, async_save: bool, base_step_s: float) -> dict:
    checkpointer.cfg.async_save = async_save
    _sync()
    t0 = time.perf_counter()
    checkpointer.save()
    _sync()
    call_s = time.perf_counter() - t0
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
            "checkpoint_gib": size / 2**30}


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
    args = ap.parse_args(argv)
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
          f"sequences per step, {device}, optimizer {type(run.optimizer).__name__}", flush=True)
    try:
        median_step(step, 3)  # warm-up
        saved: dict = {}
        rows = []
        for clip in (1.0, 0.0):
            set_clip(run.optimizer, clip)
            with_check, without = [], []
            for _ in range(2):  # interleaved, so a drifting clock (thermals, neighbours) hits both alike
                with_check.append(median_step(step, args.steps))
                set_nan_check(run.optimizer, False, saved)
                without.append(median_step(step, args.steps))
                set_nan_check(run.optimizer, True, saved)
            with_check, without = min(with_check), min(without)
            rows.append({"clip_grad": clip, "step_s_with_check": with_check, "step_s_without": without,
                         "check_ms": (with_check - without) * 1e3,
                         "check_pct": 100 * (with_check - without) / without})
        set_clip(run.optimizer, 1.0)
        checkpointer.save(blocking=True)  # warm-up: megatron-core's writer helpers start on the first save
        shutil.rmtree(checkpointer.cfg.save)
        os.makedirs(checkpointer.cfg.save)
        base = median_step(step, args.steps)
        saves = [save_window(run, step, checkpointer, args, async_save=a, base_step_s=base) for a in (False, True)]
    finally:
        checkpointer.close()
        teardown()

    print("\nNaN/inf gradient check (median step time)")
    print(f"{'clip_grad':>9} {'with check s':>13} {'without s':>10} {'cost ms':>8} {'cost %':>7}")
    for r in rows:
        print(f"{r['clip_grad']:>9} {r['step_s_with_check']:>13.4f} {r['step_s_without']:>10.4f} "
              f"{r['check_ms']:>8.2f} {r['check_pct']:>7.2f}")
    print(f"\nSave of the full model + optimizer state ({saves[0]['checkpoint_gib']:.1f} GiB), step {base:.4f} s, "
          f"window {args.window} steps")
    print(f"{'mode':>9} {'save call s':>12} {'final wait s':>13} {'lost s':>8} {'writer done after':>18}")
    for s in saves:
        print(f"{s['mode']:>9} {s['save_call_s']:>12.2f} {s['final_wait_s']:>13.2f} {s['lost_s']:>8.2f} "
              f"{str(s['writer_done_after_steps']) + ' steps':>18}")
    print(f"async saves {saves[0]['lost_s'] - saves[1]['lost_s']:.2f} s of training per save over blocking")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": device, "params": params, "step_s": base, "nan_check": rows,
                       "saves": saves}, f, indent=2)


if __name__ == "__main__":
    main()
