"""Scaled dot-product attention through the SDPA backend that measures fastest for its shape.

PyTorch chooses an SDPA backend by a fixed priority (cuDNN first on Hopper), not by speed, and at
some shapes another one is faster: the backends pad an odd head dimension differently (the so400m
ViT: 16 heads of 72 at 676 patches). ``sdpa(..., choose="measure")`` times each CUDA backend that
accepts the call once per process and shape (the batch size excluded), forward + backward on copies
of the inputs (in their layout, grown to at least ``MIN_MEASURE_BATCH`` rows: the choice serves every
batch size) (forward only under inference mode, where nothing can need a gradient), at the first
call of that shape, and from then on runs the fastest; ``CHOICES`` holds what was picked. Training
decides at its first forward (also under activation recomputation, whose first forward runs without
gradients: the timing does not depend on how it is called). The backends compute the same attention (up to bf16
rounding), so the choice changes speed, not what is learned. The other values of ``choose`` force
one backend or leave the choice to PyTorch ("default"); on the CPU every value is PyTorch's choice.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
CHOICES: dict = {}  # shape key -> the backend name measured fastest (None: none of them took the call)


def _layout(t: torch.Tensor) -> tuple:
    """The order of the dimensions by stride (what a backend's layout support and speed depend on)."""
    return tuple(sorted(range(t.dim()), key=lambda i: -t.stride(i)))


def _key(q, k, causal: bool, gqa: bool, grad: bool) -> tuple:  # grad: timed with the backward
    return (q.device, q.dtype, tuple(q.shape[1:]), tuple(k.shape[1:]), _layout(q), _layout(k), causal, gqa, grad)


# The choice holds for every batch size of the shape, so it is timed at no fewer rows than this (the
# first call's batch can be a few tiles, where launch overheads, not the kernels, decide).
MIN_MEASURE_BATCH = 16


def _seconds(fn: Callable[[], None], repeats: int = 5) -> float:
    """The fastest of ``repeats`` timed calls, after two untimed (kernel selection, workspace, plans)."""
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure_copy(t: torch.Tensor, batch: int, grad: bool) -> torch.Tensor:
    """A copy of ``t`` with ``batch`` rows (its rows repeated) in ``t``'s memory layout (what the
    backends' speed depends on), detached."""
    order = _layout(t)
    shape = list(t.shape)
    shape[0] = batch
    base = torch.empty([shape[i] for i in order], dtype=t.dtype, device=t.device)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    out = base.permute(inverse)
    with torch.no_grad():
        out.copy_(t.detach()[torch.arange(batch, device=t.device) % t.shape[0]])
    return out.requires_grad_(grad)


def measure(q, k, v, *, causal: bool, scale, gqa: bool, grad: bool,
            timer: Callable[[Callable[[], None]], float] = _seconds) -> Optional[str]:
    """The fastest backend for this call, timed on copies of q, k, v (same layout, at least
    ``MIN_MEASURE_BATCH`` rows); None if no backend takes it. A backend that rejects the call
    (RuntimeError) is skipped."""
    batch = max(q.shape[0], MIN_MEASURE_BATCH)
    with torch.enable_grad():
        qs, ks, vs = (_measure_copy(t, batch, grad) for t in (q, k, v))
    times = {}
    for name, backend in BACKENDS.items():
        def run(backend=backend):
            with sdpa_kernel([backend]), torch.enable_grad():
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa)
                if grad:
                    out.backward(torch.ones_like(out))
        try:
            times[name] = timer(run)
        except RuntimeError:
            continue
    if not times:
        return None
    best = min(times, key=times.get)
    log.info("SDPA backend for q %s k %s (%s, %s): %s (ms: %s)", tuple(q.shape[1:]), tuple(k.shape[1:]),
             q.dtype, "fwd+bwd" if grad else "fwd", best, {n: round(t * 1e3, 3) for n, t in times.items()})
    return best


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale=None,
         enable_gqa: bool = False, choose: str = "measure") -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=...)`` on
    the backend ``choose`` names: measure | default | cudnn | flash | efficient (module docstring)."""
    if choose != "default" and choose != "measure" and choose not in BACKENDS:
        raise ValueError(f"SDPA backend {choose!r}: one of measure, default, {', '.join(BACKENDS)}")
    name = None
    if q.is_cuda and choose == "measure":
        grad = not torch.is_inference_mode_enabled()
        key = _key(q, k, causal, enable_gqa, grad)
        if key not in CHOICES:
            if torch.cuda.is_current_stream_capturing():  # no timing inside a CUDA graph: PyTorch's choice
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=enable_gqa)
            CHOICES[key] = measure(q, k, v, causal=causal, scale=scale, gqa=enable_gqa, grad=grad)
        name = CHOICES[key]
    elif q.is_cuda and choose in BACKENDS:
        name = choose
    if name is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=enable_gqa)
    with sdpa_kernel([BACKENDS[name]]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=enable_gqa)
