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
    """``metrics.jsonl`` (one JSON record per line), TensorBoard and wandb under ``logging.output_dir``.

    The files are opened by :meth:`begin` (``run_stage`` calls it once the checkpoint is loaded, or
    the first ``log`` does): a fresh run (step 0) starts ``metrics.jsonl`` empty; a resumed run keeps
    the records up to its step and appends (records after it came from steps the checkpoint does not
    hold, and are re-logged). wandb continues the same run: its id is kept in ``output_dir/wandb_id``
    and passed back with ``resume="allow"``."""

    WANDB_ID = "wandb_id"

    def __init__(self, cfg, enabled: bool, run_config: dict):
        self.enabled = enabled
        self.cfg = cfg
        self.run_config = run_config
        self.tb = None
        self.wandb = None
        self.started = False
        if not enabled:
            return
        self.out = cfg.logging.output_dir
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "config.json"), "w") as f:
            json.dump(run_config, f, indent=2, default=str)
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")

    def begin(self, step: int) -> None:
        """Start logging at ``step`` (0: a fresh run; > 0: a resumed one)."""
        if self.started:
            return
        self.started = True
        if not self.enabled:
            return
        self._keep_records_until(step)
        if self.cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops TensorBoard events after the resumed step (the same steps are re-logged)
            self.tb = SummaryWriter(log_dir=os.path.join(self.out, "tensorboard"), purge_step=step or None)
        if self.cfg.logging.wandb:
            self._start_wandb(step)

    def _keep_records_until(self, step: int) -> None:
        kept = []
        if step > 0 and os.path.isfile(self.metrics_path):
            with open(self.metrics_path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short by a kill: dropped
        with open(self.metrics_path, "w") as f:
            f.writelines(kept)

    def _start_wandb(self, step: int) -> None:
        import wandb

        lg = self.cfg.logging
        id_file = os.path.join(self.out, self.WANDB_ID)
        run_id = open(id_file).read().strip() if step > 0 and os.path.isfile(id_file) else None
        run_id = run_id or wandb.util.generate_id()
        with open(id_file, "w") as f:
            f.write(run_id)
        os.environ.setdefault("WANDB_MODE", lg.wandb_mode)
        self.wandb = wandb.init(project=lg.wandb_project, dir=self.out, config=self.run_config, mode=lg.wandb_mode,
                                id=run_id, resume="allow")

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.started:
            self.begin(0)
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, "time": time.time(), **metrics}
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
