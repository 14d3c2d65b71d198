"""Build this rank's decoder for generation: process groups, our model, weights (random or loaded).

Generation uses one model chunk per rank (no virtual pipeline: there is no schedule to interleave),
no sequence parallelism (single-token decode steps cannot be split over TP) and no DDP wrapper.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron_bluelm.config.schema import RunConfig
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


def inference_config(cfg: RunConfig) -> RunConfig:
    cfg = copy.deepcopy(cfg)
    cfg.parallel.vpp = None
    cfg.parallel.sequence_parallel = False
    cfg.parallel.distributed_optimizer = False
    cfg.training.recompute = "none"
    return cfg


def build_inference_model(cfg: RunConfig, vocab_size: int) -> InferenceModel:
    """Set up TP x PP groups from ``cfg.parallel`` and build this rank's stage, randomly initialized
    with the layout-independent init (the same model under every layout); load weights after."""
    from megatron_bluelm.config.presets import apply_preset

    cfg = inference_config(cfg)
    apply_preset(cfg.model)
    p = cfg.parallel
    info = setup_parallel(p.tp, p.pp, None, 1, cfg.training.seed, p.dist_backend)
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    model = build_decoder(cfg, vocab_size, pre_process=pre, post_process=post).to(info.device)
    model.to(param_dtype(cfg))
    init_decoder_(model, cfg.training.seed, cfg.model.init_std, cfg.model.num_layers)
    return InferenceModel(model.eval(), cfg, info, vocab_size)
