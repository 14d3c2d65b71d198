"""Read and write our megatron checkpoints as ONE full (TP1, PP1) state dict, in a single process.

The model is the decoder or, for a multimodal checkpoint (its config has a vision preset), the whole
ViT + adapter + decoder (``models.multimodal.BlueLMVLM``). Reading gathers any TP x PP x DP layout:
we build the TP1/PP1 model and let megatron-core's dist_checkpointing load the global tensors into it
(the same resharding a training resume does). Writing saves a model-only checkpoint (``meta.json``
contents ``["model"]``) in the training layout (``SAVE/iter_0000000`` + ``latest``), loadable by any
layout. The on-disk format is owned by ``training/checkpointing.py``; this module only reuses it.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_bluelm.config.schema import ModelConfig, RunConfig
from megatron_bluelm.config.vision import VisionConfig
from megatron_bluelm.training import checkpointing as ckpt


def start_single_process() -> None:
    """A one-rank gloo group (conversion runs as a plain process, no launcher), on a free port."""
    from megatron_bluelm.parallel.setup import setup_parallel

    if not dist.is_initialized():  # one rank whatever the environment says; setup_parallel picks a free port
        os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    setup_parallel(1, 1, None, 1, seed=0, dist_backend="gloo")


def run_config_from_meta(meta: dict) -> RunConfig:
    """The model (and vision) sections of the saved config, on a single-process layout."""
    cfg = RunConfig()
    saved = meta["config"]
    cfg.model = ModelConfig(**saved["model"])
    if "vision" in saved:
        cfg.vision = VisionConfig(**saved["vision"])
        cfg.vision.resolve()
    cfg.data.tokenizer_model = saved["data"]["tokenizer_model"]
    cfg.data.seq_length = saved["data"]["seq_length"]
    cfg.training.precision = "fp32"
    return cfg


def build_model(cfg: RunConfig, vocab_size: int, image_token_id: int | None = None):
    """The TP1 decoder, or the multimodal model (ViT + adapter + decoder) when ``cfg.vision`` is set."""
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.models.init import mark_tensor_parallel_
    from megatron_bluelm.models.multimodal import BlueLMVLM

    if cfg.vision.enabled:
        if image_token_id is None:
            raise ValueError("the multimodal model needs the tokenizer's <image> id")
        model = BlueLMVLM(cfg, vocab_size, image_token_id)
    else:
        model = build_decoder(cfg, vocab_size)
    mark_tensor_parallel_(model)
    return model


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _load_groups(sharded: dict) -> list[dict]:
    """The model's sharded state dict cut into one group per checkpoint tensor (``ShardedTensor.key``:
    megatron-core stores a tensor of every layer as one stacked tensor, read whole), in order: each
    group is one ``dist_checkpointing.load``, so a progress bar can advance per group."""
    groups: dict[str, dict] = {}
    for name, value in sharded.items():
        groups.setdefault(getattr(value, "key", name), {})[name] = value
    return list(groups.values())


def _nbytes(group: dict) -> int:
    """Tensor bytes of a group (ShardedTensors and factories such as the fused SwiGLU fc1's)."""
    datas = (getattr(v, "data", None) for v in group.values())
    return sum(d.numel() * d.element_size() for d in datas if isinstance(d, torch.Tensor))


def load_full(model, path: str) -> dict[str, torch.Tensor]:
    """Fill ``model`` (TP1) from the checkpoint directory ``path``; returns its tensors. Loaded one
    checkpoint tensor at a time (megatron-core's load is one silent call) under a byte bar (tqdm,
    stderr): what advances it is the bytes of the tensors each load has read and resharded."""
    from tqdm import tqdm

    sharded = model.sharded_state_dict(metadata=ckpt.SHARDED_METADATA)
    ckpt.check_shapes({"model0": sharded}, path)
    groups = _load_groups(sharded)
    state: dict = {}
    with tqdm(total=sum(map(_nbytes, groups)), desc=f"reading {path}", unit="B", unit_scale=True,
              unit_divisor=1024, leave=False) as bar:
        for group in groups:
            state.update(dist_checkpointing.load({"model0": group}, path)["model0"])
            bar.update(_nbytes(group))
    model.load_state_dict(state, strict=True)
    return _tensors(model)


def save_model_only(model, cfg: RunConfig, root: str, extra_meta: dict, iteration: int = 0) -> str:
    from megatron_bluelm.config.loader import to_dict

    path = ckpt.iter_dir(root, iteration)
    os.makedirs(path, exist_ok=False)
    dist_checkpointing.save({"model0": model.sharded_state_dict(metadata=ckpt.SHARDED_METADATA)}, path)
    meta = {"format_version": ckpt.FORMAT_VERSION, "iteration": iteration, "consumed_samples": 0,
            "contents": ["model"], "layout": {"tp": 1, "pp": 1, "dp": 1, "vpp": None, "world_size": 1,
                                               "distributed_optimizer": False},
            "config": to_dict(cfg), **extra_meta}
    ckpt.mark_complete(root, iteration, meta, keep_last=1)
    return path
