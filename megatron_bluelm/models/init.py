"""Layout-independent weight initialization.

megatron-core draws each shard from a per-TP-rank RNG stream, so the same seed gives a different model
under TP2 than under TP1, and pipeline stages consume the RNG in a different order. We instead draw
every *full* tensor from a generator seeded by (seed, global parameter name) and keep this rank's
shard. The same seed therefore yields the same model under any TP x PP x DP layout: runs are
reproducible across layouts and the parallel-equivalence tests compare identical models.

Distribution (megatron-core's defaults): weights ~ N(0, std); the two residual-branch output
projections (``linear_proj``, ``linear_fc2``) ~ N(0, std / sqrt(2 * num_layers)); norm weights = 1.
"""
from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_block import TransformerBlock

_LAYER_RE = re.compile(r"(decoder\.layers\.)(\d+)(\.)")  # first match: the block's own layer
_SCALED = ("linear_proj.weight", "linear_fc2.weight")


def global_param_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> name with *global* layer indices (pipeline-invariant).

    Every TransformerBlock of the model is renumbered by its layers' global ``layer_number``: the
    decoder's, and in the multimodal model the vision encoder's too (``vision_model.decoder``)."""
    offsets = {}  # "<block>.layers.<local>." -> "<block>.layers.<global>."
    for block_name, block in model.named_modules():
        if isinstance(block, TransformerBlock):
            prefix = f"{block_name}.layers." if block_name else "layers."
            for local_idx, layer in enumerate(block.layers):  # layer_number is global, 1-based
                offsets[f"{prefix}{local_idx}."] = f"{prefix}{layer.layer_number - 1}."
    names = {}
    for name, _ in model.named_parameters():
        m = _LAYER_RE.search(name)
        key = m and name[: m.start()] + m.group(1) + m.group(2) + m.group(3)
        names[name] = offsets[key] + name[len(key):] if key in offsets else name
    return names


def _draw(shape, std, seed, name, device, dtype):
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, std, generator=gen).to(dtype)


def is_glu_weight(param, name: str) -> bool:
    """A gated MLP's fused [gate; up] weight. Non-gated MLPs (the vision encoder) mark their fc1
    weight ``glu = False``: it is one matrix, drawn and sharded as such."""
    return name.endswith("linear_fc1.weight") and getattr(param, "glu", True)


def _local_shard(param, name, std, seed, tp_rank, tp_size):
    """This rank's slice of the full tensor named ``name``."""
    sharded = getattr(param, "tensor_model_parallel", False) and tp_size > 1
    dim = param.partition_dim if sharded else 0
    parts = tp_size if sharded else 1
    full_shape = list(param.shape)
    full_shape[dim] *= parts
    if is_glu_weight(param, name):
        # GLU: the local shard is [gate_i; up_i], so gate and up are drawn (and sharded) separately.
        half = [full_shape[0] // 2] + full_shape[1:]
        gate_up = [_draw(half, std, seed, f"{name}:{p}", param.device, param.dtype) for p in ("gate", "up")]
        return torch.cat([t.chunk(parts, dim=0)[tp_rank if sharded else 0] for t in gate_up], dim=0)
    full = _draw(full_shape, std, seed, name, param.device, param.dtype)
    return full.chunk(parts, dim=dim)[tp_rank if sharded else 0]


# Which dimension each megatron-core parallel layer shards its weight on.
_PARTITION_DIM = ((ColumnParallelLinear, 0), (RowParallelLinear, 1), (VocabParallelEmbedding, 0))


def mark_tensor_parallel_(model: torch.nn.Module) -> None:
    """megatron-core sets the TP attributes (``tensor_model_parallel``, ``partition_dim``) only inside
    its own initializers, which we skip (``perform_initialization=False``). Grad-norm clipping, the
    distributed optimizer and our init all read them, so set them here."""
    for module in model.modules():
        for cls, dim in _PARTITION_DIM:
            weight = getattr(module, "weight", None)
            if isinstance(module, cls) and weight is not None and not hasattr(weight, "partition_dim"):
                set_tensor_model_parallel_attributes(weight, True, dim, 1)


@torch.no_grad()
def init_decoder_(model: torch.nn.Module, seed: int, std: float, num_layers: int) -> None:
    """Initialize every parameter of one model chunk in place (see module docstring)."""
    mark_tensor_parallel_(model)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    names = global_param_names(model)
    scaled_std = std / math.sqrt(2.0 * num_layers)
    for local_name, param in model.named_parameters():
        name = names[local_name]
        if name.endswith(".bias"):
            param.zero_()  # biases (none in the BlueLM decoder; the vision encoder's and adapter's)
        elif "layernorm" in name or name.endswith("norm.weight"):
            param.fill_(1.0)
        elif param.dim() == 1:
            param.zero_()
        else:
            s = scaled_std if name.endswith(_SCALED) else std
            param.copy_(_local_shard(param, name, s, seed, tp_rank, tp_size))
