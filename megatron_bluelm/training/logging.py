"""Console, TensorBoard and wandb (offline by default) logging of training metrics.

Only one rank logs (the last: it holds the loss). MFU = achieved model TFLOP/s per GPU / peak bf16
TFLOP/s per GPU; the peak is ``logging.peak_tflops`` or the dense bf16 datasheet figure of the GPU
(table below), and unknown on CPU (MFU is then not shown).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from typing import Optional

import torch

from megatron_bluelm.config.errors import ConfigError

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' datasheets.
_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
                     "L40S": 362.0, "B200": 2250.0, "GB200": 2500.0}


def device_peak_tflops(override: Optional[float]) -> Optional[float]:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def check_logging_backends(cfg) -> None:
    """Fail at start-up (not after hours of training) if a requested logger cannot be imported."""
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb: wandb is not installed (pip install wandb), or set logging.wandb false")
    if cfg.logging.tensorboard and importlib.util.find_spec("torch.utils.tensorboard") is None:
        raise ConfigError("logging.tensorboard: tensorboard is not installed, or set logging.tensorboard false")


class RunLogger:
    def __init__(self, cfg, enabled: bool, run_config: dict):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.history: list[dict] = []
        if not enabled:
            return
        out = cfg.logging.output_dir
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(run_config, f, indent=2, default=str)
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        open(self.metrics_path, "w").close()
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(out, "tensorboard"))
        if cfg.logging.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
            self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=out, config=run_config,
                                    mode=cfg.logging.wandb_mode)

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, "time": time.time(), **metrics}
        self.history.append(record)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
