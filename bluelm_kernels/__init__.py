"""Fused kernels for the BlueLM decoder (see docs/KERNELS.md).

Each op has a Triton kernel (forward and backward, torch.autograd-capable) and a pure-torch
`*_ref` twin in the same module; `use_triton(x)` picks between them per call.
"""

from .attention import attention, attention_ref
from .cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_ref
from .dispatch import triton_available, use_triton
from .layernorm import layernorm, layernorm_ref
from .rmsnorm import FusedRMSNorm, rmsnorm, rmsnorm_ref
from .rope import apply_rope, apply_rope_qk, apply_rope_qk_, apply_rope_ref
from .swiglu import swiglu, swiglu_ref

__all__ = [
    "FusedRMSNorm",
    "apply_rope",
    "apply_rope_qk",
    "apply_rope_qk_",
    "apply_rope_ref",
    "attention",
    "attention_ref",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "layernorm",
    "layernorm_ref",
    "rmsnorm",
    "rmsnorm_ref",
    "swiglu",
    "swiglu_ref",
    "triton_available",
    "use_triton",
]
