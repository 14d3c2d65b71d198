"""Workers for the multimodal training tests (module level: spawned by run_distributed)."""
import os

from megatron_bluelm.config.data import ASSETS
from megatron_bluelm.config.loader import load_config

CAPTIONS = os.path.join(ASSETS, "images", "captions.jsonl")  # the bundled image-text demo set


def overrides(prefix, out_dir, steps, extra=()):
    return ["--data.prefix", prefix, "--data.seq_length", "256", "--data.split", "1,0,0",
            "--model.preset", "tiny", "--vision.preset", "vit-tiny", "--vision.max_tiles", "4",
            "--training.train_steps", str(steps), "--training.micro_batch_size", "1",
            "--training.global_batch_size", "4", "--training.eval_interval", "0",
            "--optimizer.lr", "2e-3", "--schedule.warmup_steps", "1", "--logging.output_dir", out_dir,
            "--logging.tensorboard", "false", "--logging.log_interval", "100",
            "--data.cache_dir", f"{out_dir}/cache"] + list(extra)


def train_mm(args, pretrained=None):
    """Train the multimodal model; return the losses and the full trained parameters."""
    from megatron_bluelm.parallel.gather import full_state_dict
    from megatron_bluelm.stages.multimodal import run_multimodal

    res = run_multimodal(load_config(None, args), pretrained, collect=lambda run: full_state_dict(run.model))
    return {"losses": res["losses"], "params": res["collected"]}


def train_text(args):
    from megatron_bluelm.parallel.gather import full_state_dict
    from megatron_bluelm.stages.pretrain import run_pretrain

    res = run_pretrain(load_config(None, args), collect=lambda run: full_state_dict(run.model))
    return {"losses": res["losses"], "params": res["collected"]}
