"""Assemble the full (unsharded) parameters of a model from any TP x PP x VPP layout.

Used by the layout-equivalence tests and by tools that need one canonical copy of the weights.
Names are global (decoder layer indices counted over the whole model, see ``models/init.py``); the
GLU weight ``linear_fc1`` is returned as [gate; up] of the full width, i.e. exactly the TP1 layout.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bluelm.models.init import global_param_names, is_glu_weight


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def _gather_tp(param: torch.nn.Parameter, name: str) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    parts = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(parts, param.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    if is_glu_weight(param, name):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=param.partition_dim)


def full_state_dict(chunks: Iterable[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every rank returns the complete {global name: CPU tensor} of the model."""
    local: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        module = _unwrap(chunk)
        names = global_param_names(module)
        for local_name, param in module.named_parameters():
            local[names[local_name]] = _gather_tp(param, local_name).cpu()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return local
    stages: list = [None] * pp
    dist.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        merged.update(stage)
    return merged
