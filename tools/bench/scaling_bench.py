"""Scaling benchmark: the same model under a list of parallel layouts, one torchrun per layout.

    python tools/bench/scaling_bench.py --gpus 4 --preset bluelm-2.5-3b --seq 4096
    python tools/bench/scaling_bench.py --gpus 2 --layouts dp2,tp2,pp2-vpp2 --steps 8
    python tools/bench/scaling_bench.py --cpu --gpus 4 --preset tiny --seq 128   # gloo, a smoke run
    python tools/bench/scaling_bench.py --gpus 4 --vision vit-so400m --max-tiles 6 --layouts dp2,tp2,pp2

With ``--vision PRESET`` the multimodal model (ViT + adapter + decoder) is measured through the
multimodal stage on the bundled image-text set, every image resized to the full tile grid's canvas
(``--max-tiles`` 6: 2 x 3 tiles + thumbnail), so that each sample's ViT work is exactly what the
stage's FLOPs count assumes (max_tiles + thumbnail tiles per sequence); the set is preprocessed once
per call into a temporary folder and decoded and tiled by the loader as in training. One record per
sample (no packing across records), padded to --seq. A layout the stage's config check rejects is
reported as skipped, with the reason.

Weak scaling: every data-parallel rank keeps the same micro-batch and micro-batch count, so the
global batch grows with DP. Per layout it prints tokens/s per GPU, model TFLOP/s per GPU, MFU (vs the
datasheet peak), peak memory per GPU (max over ranks) and the efficiency = tokens/s per GPU relative
to the 1-GPU run of the same call. Layouts needing more GPUs than --gpus are skipped.

Layout names: dpN, tpN, ppN, ppN-vppV, tpA-ppB, tpA-dpB (dp is implied: world / (tp*pp)); suffixes
``+sp`` (sequence parallel), ``+do`` (distributed optimizer; on by default when dp > 1),
``+ov`` (overlap grad reduce / param gather).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
DEFAULT_LAYOUTS = ("1gpu,dp2,dp4,tp2,tp4,pp2,pp4,pp2-vpp2,pp4-vpp7,tp2-pp2,tp2-dp2,"
                   "dp2+ov,dp4+ov,tp2+sp,tp4+sp")


def parse_layout(name: str) -> dict:
    """'tp2-pp2+sp' -> {'tp': 2, 'pp': 2, 'vpp': None, 'dp': None, 'sp': True, ...}."""
    base, *flags = name.split("+")
    out = {"tp": 1, "pp": 1, "vpp": None, "dp": None, "sp": "sp" in flags, "ov": "ov" in flags,
           "do": "do" in flags}
    if base == "1gpu":
        out["dp"] = 1
        return out
    for key, value in re.findall(r"(tp|pp|vpp|dp)(\d+)", base):
        out[key] = int(value)
    return out


def world_size(layout: dict) -> int:
    return layout["tp"] * layout["pp"] * (layout["dp"] or 1)


def overrides(layout: dict, args) -> list[str]:
    dp = layout["dp"] or 1
    micro = args.microbatches * (layout["pp"] if layout["vpp"] else 1)  # interleaving needs n % pp == 0
    o = ["--model.preset", args.preset, "--data.mock", "true", "--data.seq_length", str(args.seq),
         "--training.micro_batch_size", str(args.mbs), "--training.global_batch_size", str(args.mbs * micro * dp),
         "--training.train_steps", str(args.steps), "--training.eval_interval", "0",
         "--schedule.warmup_steps", "1", "--logging.log_interval", str(max(args.steps // 2, 1)),
         "--logging.tensorboard", "false", "--training.recompute", args.recompute,
         "--parallel.tp", str(layout["tp"]), "--parallel.pp", str(layout["pp"]),
         "--parallel.distributed_optimizer", str(layout["do"] or dp > 1).lower(),
         "--parallel.sequence_parallel", str(layout["sp"]).lower(),
         "--parallel.overlap_grad_reduce", str(layout["ov"]).lower(),
         "--parallel.overlap_param_gather", str(layout["ov"] and (layout["do"] or dp > 1)).lower()]
    if layout["vpp"]:
        o += ["--parallel.vpp", str(layout["vpp"])]
    if args.vocab:
        o += ["--model.vocab_size", str(args.vocab)]
    if getattr(args, "vision", "none") != "none":
        o += ["--vision.preset", args.vision, "--vision.max_tiles", str(args.max_tiles),
              "--data.mock", "false", "--data.prefix", args.mm_prefix, "--data.split", "1,0,0"]
    return o


def bench_grid(max_tiles: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == max_tiles, closest to square (6 -> 2 x 3)."""
    rows = max(r for r in range(1, max_tiles + 1) if max_tiles % r == 0 and r * r <= max_tiles)
    return rows, max_tiles // rows


def prepare_multimodal_data(out_dir: str, vision: str, max_tiles: int) -> str:
    """The bundled image-text set, every image resized to the canvas of the full tile grid (so each
    costs exactly max_tiles tiles + the thumbnail, the ViT work the FLOPs count assumes), preprocessed
    into out_dir; returns its data.prefix."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from PIL import Image

    from megatron_bluelm.config.data import ASSETS, BUNDLED_TOKENIZER
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.data.images import ImageProcessor
    from megatron_bluelm.data.multimodal import MultimodalOptions, preprocess_multimodal

    v = load_config(None, ["--vision.preset", vision, "--vision.max_tiles", str(max_tiles)]).vision
    v.resolve()
    rows, cols = bench_grid(max_tiles)
    size = (cols * v.image_size, rows * v.image_size)
    src = os.path.join(ASSETS, "images")
    records = []
    with open(os.path.join(src, "captions.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            for k, name in enumerate(rec.get("images", [])):
                out = os.path.join(out_dir, os.path.splitext(name)[0] + ".png")
                Image.open(os.path.join(src, name)).convert("RGB").resize(size, Image.BICUBIC).save(out)
                rec["images"][k] = out
            records.append(rec)
    tiles = ImageProcessor.from_config(v).num_tiles(*size)
    assert tiles == max_tiles + int(v.thumbnail and max_tiles > 1), tiles
    with open(os.path.join(out_dir, "captions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    out = os.path.join(out_dir, "captions")
    preprocess_multimodal(MultimodalOptions([os.path.join(out_dir, "captions.jsonl")], out, BUNDLED_TOKENIZER))
    print(f"multimodal data: {len(records)} bundled records, images resized to {size[0]}x{size[1]} "
          f"({rows}x{cols} tiles + thumbnail = {tiles} tiles per image)", flush=True)
    return out + "_text_document"


def _error_line(log: str) -> str:
    """The worker's exception line of a failed run, not torchrun's ChildFailedError banner."""
    lines = [ln.strip() for ln in log.splitlines() if re.search(r"(Error|Exception)\b.*:", ln)]
    own = [ln for ln in lines if "ChildFailedError" not in ln and "torch.distributed.elastic" not in ln]
    return (own or lines)[-1][:300] if lines else "failed (no exception in the log)"


def check_layout(layout: dict, args) -> str | None:
    """The trainer's own config validation, before spending a launch: None or the error."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from megatron_bluelm.config.errors import ConfigError
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.config.validate import validate

    try:
        cfg = load_config(None, overrides(layout, args))
        validate(cfg, world_size(layout))
        if cfg.vision.enabled:
            from megatron_bluelm.stages.multimodal import multimodal_config

            multimodal_config(cfg)
    except ConfigError as e:
        return str(e)
    return None


def run_layout(name: str, args) -> dict:
    layout = parse_layout(name)
    world = world_size(layout)
    problem = check_layout(layout, args)
    if problem:
        return {"layout": name, "world": world, "skipped": f"invalid layout: {problem}"}
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               os.path.join(os.path.dirname(os.path.abspath(__file__)), "scaling_worker.py"), result_path,
               *overrides(layout, args), "--logging.output_dir", tmp]
        env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        if proc.returncode != 0 or not os.path.exists(result_path):
            return {"layout": name, "world": world, "error": _error_line(proc.stderr + proc.stdout),
                    "log_tail": (proc.stderr or proc.stdout)[-3000:]}
        with open(result_path) as f:
            return {"layout": name, "world": world, **json.load(f)}


def measure(names: list[str], args) -> list[dict]:
    """Run every layout that fits args.gpus (one torchrun each); the others are marked skipped."""
    results = []
    for name in names:
        if world_size(parse_layout(name)) > args.gpus:
            results.append({"layout": name, "world": world_size(parse_layout(name)), "skipped": "needs more GPUs"})
            continue
        r = run_layout(name, args)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=None, help="GPUs available (default: all visible)")
    ap.add_argument("--cpu", action="store_true", help="run on gloo CPU ranks (a functional smoke run)")
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS)
    ap.add_argument("--preset", default="bluelm-2.5-3b")
    ap.add_argument("--vision", default="none", help="vision preset (vit-so400m, vit-tiny): the multimodal model")
    ap.add_argument("--max-tiles", type=int, default=6, help="with --vision: tiles per image (+ thumbnail)")
    ap.add_argument("--vocab", type=int, default=100_000)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=8, help="micro-batches per step and DP rank")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--recompute", default="none")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("no CUDA device: pass --cpu for a gloo smoke run")
        args.gpus = args.gpus or torch.cuda.device_count()
    args.gpus = args.gpus or 1
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    if "1gpu" not in names:
        names.insert(0, "1gpu")
    with tempfile.TemporaryDirectory() as tmp:
        args.mm_prefix = prepare_multimodal_data(tmp, args.vision, args.max_tiles) if args.vision != "none" else None
        results = measure(names, args)
    base = next((r for r in results if r["layout"] == "1gpu" and "tokens_per_s_per_gpu" in r), None)
    model = args.preset
    if args.vision != "none":
        model += f" + {args.vision} ViT ({args.max_tiles} tiles + thumbnail)"
    print(f"\n{model}, seq {args.seq}, micro-batch {args.mbs} x {args.microbatches} per DP rank, "
          f"{args.steps} steps (weak scaling)")
    print(f"{'layout':<14}{'GPUs':>5}{'tok/s/GPU':>12}{'TFLOP/s/GPU':>13}{'MFU':>8}{'mem GiB':>9}{'eff.':>8}")
    for r in results:
        if "tokens_per_s_per_gpu" not in r:
            print(f"{r['layout']:<14}{r['world']:>5}  {r.get('skipped') or r.get('error')}")
            continue
        eff = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.0%}" if base else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        print(f"{r['layout']:<14}{r['world']:>5}{r['tokens_per_s_per_gpu']:>12,.0f}{r['tflops_per_gpu']:>13.1f}"
              f"{mfu:>8}{r['peak_mem_gib']:>9.1f}{eff:>8}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "mm_prefix"}, "results": results},
                      f, indent=2)


if __name__ == "__main__":
    main()
