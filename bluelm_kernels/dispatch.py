"""The one place that decides whether a call runs a Triton kernel or its torch reference."""

import os

import torch

from ._triton import HAS_TRITON, INTERPRETED


def triton_available() -> bool:
    """True when Triton imports and kernels may run (GPU, or the CPU interpreter)."""
    return HAS_TRITON and os.environ.get("BLUELM_DISABLE_TRITON", "0") != "1"


def interpreting() -> bool:
    """True under `TRITON_INTERPRET=1` when the kernels were also imported under it: Triton then
    runs on CPU tensors (slowly; for tests). Kernels imported without it stay on the torch
    reference for CPU tensors even if the variable is set later."""
    return INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Run the Triton kernel for `x`? Yes on CUDA tensors, and on CPU tensors under the
    interpreter; no otherwise (the torch reference runs). `BLUELM_DISABLE_TRITON=1` forces
    the reference everywhere, e.g. to bisect a numerical difference."""
    if not triton_available():
        return False
    return x.is_cuda or (x.device.type == "cpu" and interpreting())
