"""Decoder layer specs: one megatron-core ``ModuleSpec`` per backend, the same layer structure in all.

    te     Transformer Engine norms, linears and attention (NVIDIA containers).
    fused  our Triton kernels (``bluelm_kernels/``): RMSNorm, SwiGLU, RoPE; SDPA attention.
    torch  plain PyTorch: the same math, no custom kernels; runs anywhere, CPU included.

``auto`` picks te if importable, else fused on CUDA with Triton, else torch. Every backend names its
parameters identically (``input_layernorm.weight``, ``self_attention.linear_qkv.weight``, ...), so a
checkpoint trained with one loads into another.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.schema import ModelConfig, choices_of
from megatron_bluelm.models.attention import BlueLMSelfAttention, SDPACoreAttention, torch_rope
from megatron_bluelm.models.norm import RMSNorm

BACKENDS = tuple(b for b in choices_of(ModelConfig, "backend") if b != "auto")  # the schema lists them


def triton_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def resolve_backend(requested: str) -> str:
    """``auto`` -> te | fused | torch by what this process can use; explicit choices are checked."""
    if requested == "auto":
        if HAVE_TE and torch.cuda.is_available():
            return "te"
        return "fused" if triton_usable() else "torch"
    if requested == "te" and not (HAVE_TE and torch.cuda.is_available()):
        raise ConfigError("model.backend: 'te' needs Transformer Engine and a CUDA device")
    if requested not in BACKENDS:
        raise ConfigError(f"model.backend: {requested!r} is not one of {('auto',) + BACKENDS}")
    return requested


def _fused_rope(query, key, freqs, config):
    # query and key in one launch (and one for their gradients), not one per tensor
    from bluelm_kernels.rope import apply_rope_qk

    return apply_rope_qk(query, key, freqs)


def _fused_split_rope(mixed_qkv, freqs, heads_per_group):
    # the QKV split and RoPE in one op: its backward writes dq, dk, dv into one d(mixed_qkv) (no cat)
    from bluelm_kernels.rope import split_rope_qkv

    return split_rope_qkv(mixed_qkv, freqs, heads_per_group)


class FusedSwiGLU(torch.nn.Module):
    """MLP activation module for the fused backend: silu(gate) * up on fc1's [gate, up] output."""

    def __init__(self, config=None, **unused):
        super().__init__()

    def forward(self, x):
        from bluelm_kernels.swiglu import swiglu

        return swiglu(x)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # megatron's MLP.sharded_state_dict asks every child module for one; this one has no state
        return {}


def _parts(backend: str):
    """(norm, column linear, row linear, core attention, rope function, MLP activation module)."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )

        return TENorm, TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention, torch_rope, None
    if backend == "fused":
        from bluelm_kernels.rmsnorm import FusedRMSNorm

        return FusedRMSNorm, ColumnParallelLinear, RowParallelLinear, SDPACoreAttention, _fused_rope, FusedSwiGLU
    return RMSNorm, ColumnParallelLinear, RowParallelLinear, SDPACoreAttention, torch_rope, None


def prenorm_layer_spec(norm, column, row, core_attention, attention_params: dict, activation=None,
                       layer=TransformerLayer, mlp=MLP) -> ModuleSpec:
    """A pre-norm transformer layer of the given parts (the decoder's and the ViT's: they differ in the
    parts, the attention mask and the MLP activation only). ``layer``: megatron-core's layer, or the
    fused backend's ``ResidualNormLayer`` (models/layer.py: the residual adds in the norms' kernels);
    ``mlp``: megatron-core's MLP, or the fused ViT's ``VisionMLP`` (models/vision.py)."""
    return ModuleSpec(
        module=layer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=BlueLMSelfAttention,
                params=attention_params,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    core_attention=core_attention,
                    linear_proj=row,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=mlp,
                submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row, activation_func=activation),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


@functools.lru_cache(maxsize=None)
def decoder_layer_spec(backend: str) -> ModuleSpec:
    norm, column, row, core_attention, rope_fn, activation = _parts(backend)
    params = {"attn_mask_type": AttnMaskType.causal, "rope_fn": rope_fn}
    layer = TransformerLayer
    if backend == "fused":
        from megatron_bluelm.models.layer import ResidualNormLayer

        params["split_rope_fn"] = _fused_split_rope
        layer = ResidualNormLayer
    return prenorm_layer_spec(norm, column, row, core_attention, params, activation, layer)


def decoder_block_spec(backend: str, config, vp_stage=None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers plus the final norm, all of the chosen backend."""
    norm = _parts(backend)[0]
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[decoder_layer_spec(backend)] * layers, layer_norm=norm)
