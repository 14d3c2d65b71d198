"""Build this rank's model for generation: process groups, our model, weights (random or loaded).

The text decoder (``BlueLMModel``), or the multimodal model (``BlueLMVLM``: ViT + adapter on the first
pipeline stage, then the decoder) when the config has a vision preset (``vision.preset`` != none, as
in the checkpoints of the multimodal stage). Generation uses one model chunk per rank (no virtual
pipeline: there is no schedule to interleave), no sequence parallelism (single-token decode steps
cannot be split over TP) and no DDP wrapper.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron_bluelm.config.schema import RunConfig
from megatron_bluelm.inference.errors import GenerationError
from megatron_bluelm.models.decoder import build_decoder, param_dtype
from megatron_bluelm.models.init import init_decoder_
from megatron_bluelm.parallel.setup import ParallelInfo, setup_parallel


@dataclass
class InferenceModel:
    model: torch.nn.Module
    cfg: RunConfig
    info: ParallelInfo
    vocab_size: int  # the tokenizer's; logits beyond it are padding

    @property
    def max_context(self) -> int:
        return self.cfg.data.seq_length

    @property
    def is_multimodal(self) -> bool:
        return self.cfg.vision.enabled

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder (the whole model for text checkpoints)."""
        return getattr(self.model, "language_model", self.model)

    @property
    def has_vision(self) -> bool:
        """This rank holds the ViT + adapter (the first pipeline stage of a multimodal model)."""
        return hasattr(self.model, "vision_model")


def inference_config(cfg: RunConfig) -> RunConfig:
    cfg = copy.deepcopy(cfg)
    cfg.parallel.vpp = None
    cfg.parallel.sequence_parallel = False
    cfg.parallel.distributed_optimizer = False
    cfg.training.recompute = "none"
    return cfg


def set_layout(cfg: RunConfig, tp: int, pp: int) -> RunConfig:
    """Generate under ``tp`` x ``pp``, whatever layout trained the checkpoint. A pipeline split saved
    for another ``pp`` (``first_stage_layers`` / ``last_stage_layers``) does not apply: it is dropped
    (a multimodal model then gets the cost model's split again)."""
    p = cfg.parallel
    if pp != p.pp:
        p.first_stage_layers = p.last_stage_layers = None
    p.tp, p.pp = tp, pp
    return cfg


def build_inference_model(cfg: RunConfig, vocab_size: int, image_token_id: int | None = None) -> InferenceModel:
    """Set up TP x PP groups from ``cfg.parallel`` and build this rank's stage, randomly initialized
    with the layout-independent init (the same model under every layout); load weights after.
    A multimodal config (``vision.preset``) builds ``BlueLMVLM``, which needs ``image_token_id``."""
    from megatron_bluelm.config.presets import apply_preset

    cfg = inference_config(cfg)
    apply_preset(cfg.model)
    if cfg.vision.enabled:
        if image_token_id is None:
            raise GenerationError(f"vision.preset {cfg.vision.preset!r}: the multimodal model needs the "
                                  "tokenizer's <image> id (image_token_id)")
        from megatron_bluelm.models.multimodal import resolve_vision_layout

        resolve_vision_layout(cfg)
    p = cfg.parallel
    info = setup_parallel(p.tp, p.pp, None, 1, cfg.training.seed, p.dist_backend)
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if cfg.vision.enabled:
        from megatron_bluelm.models.multimodal import BlueLMVLM

        model = BlueLMVLM(cfg, vocab_size, image_token_id, pre_process=pre, post_process=post)
    else:
        model = build_decoder(cfg, vocab_size, pre_process=pre, post_process=post)
    model = model.to(info.device)
    model.to(param_dtype(cfg))
    init_decoder_(model, cfg.training.seed, cfg.model.init_std, cfg.model.num_layers)
    return InferenceModel(model.eval(), cfg, info, vocab_size)
