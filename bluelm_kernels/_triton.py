"""Optional Triton import.

Triton is an optional dependency (DESIGN.md): every kernel module imports `triton` and `tl`
from here so that importing `bluelm_kernels` works without it. Without Triton the `@triton.jit`
decorator is a no-op and only the torch references run.
"""

import os

# Triton decides interpreted-vs-compiled when a kernel is decorated (module import), so the
# dispatcher must know how *these* kernels were built, not only what the env says now.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    import types

    HAS_TRITON = False

    def _jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=object)

__all__ = ["HAS_TRITON", "INTERPRETED", "tl", "triton"]
