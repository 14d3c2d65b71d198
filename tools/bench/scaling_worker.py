"""One layout of tools/bench/scaling_bench.py (run under torchrun): train a few steps on synthetic
tokens through the pretrain stage (or, with a vision preset, on image-text data through the
multimodal stage) and write the last-interval throughput and the peak memory (max
over ranks) as JSON. Usage: scaling_worker.py RESULT.json [--section.field value ...]"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_bluelm.config.loader import load_config  # noqa: E402
from megatron_bluelm.stages.multimodal import run_multimodal  # noqa: E402
from megatron_bluelm.stages.pretrain import run_pretrain  # noqa: E402


def collect(run) -> dict:
    mem = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0])
    if torch.cuda.is_available():
        mem = mem.cuda()
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    last = next((h for h in reversed(run.history) if "tokens_per_s_per_gpu" in h), {})
    return {"peak_mem_gib": mem.item(), "tokens_per_s_per_gpu": last.get("tokens_per_s_per_gpu"),
            "tflops_per_gpu": last.get("tflops_per_gpu"), "mfu": last.get("mfu"), "loss": last.get("loss")}


def main() -> None:
    result_path, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(None, overrides)
    result = (run_multimodal if cfg.vision.enabled else run_pretrain)(cfg, collect=collect)
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        with open(result_path, "w") as f:
            json.dump(result["collected"], f)


if __name__ == "__main__":
    main()
