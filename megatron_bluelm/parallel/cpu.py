"""Run megatron-core on a machine without CUDA.

megatron-core is written for CUDA: schedules allocate with ``device="cuda"``, layers call
``torch.cuda.current_device()``, the RNG tracker swaps CUDA generator states, the optimizer checks
``param.type() == 'torch.cuda.FloatTensor'``. Everything else (gloo collectives, autograd, the
schedules' logic) works on CPU tensors. This module is the *only* place where we bend megatron-core
for CPU; it is entered once per process by :func:`enable_cpu_mode` and only when CUDA is absent.

What it changes, and why each is safe on a CPU-only process:

1. ``CudaToCpuMode`` (a ``TorchFunctionMode``): every torch call that names a CUDA device (``device=``
   keyword, ``Tensor.cuda()``, ``Tensor.to('cuda')``) gets the CPU instead; ``Tensor.type()`` with no
   argument reports the CUDA type name of a CPU tensor, because megatron-core's optimizers and
   grad clipping dispatch on those names (e.g. ``'torch.cuda.FloatTensor'``).
2. ``torch.cuda`` functions megatron-core calls that would raise without a driver
   (``current_device``, ``synchronize``, ``empty_cache``, RNG get/set/seed, ``memory_*``) become CPU
   equivalents. The "CUDA RNG" becomes the CPU default generator, so the model-parallel RNG tracker
   forks and restores the CPU generator exactly as it would the CUDA one.
3. ``megatron.core.tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state`` read and write
   the CPU generator.

``tests/test_cpu_compat.py`` checks each patched name still exists in megatron-core, so an upgrade that
renames one fails loudly instead of silently falling back to a CUDA call.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_MODE: TorchFunctionMode | None = None

# The megatron-core names we replace: (module path, attribute). Checked by tests.
PATCHED_MEGATRON_NAMES = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
)
PATCHED_TORCH_CUDA_NAMES = (
    "current_device", "synchronize", "empty_cache", "manual_seed", "manual_seed_all",
    "get_rng_state", "set_rng_state", "memory_allocated", "max_memory_allocated",
    "reset_peak_memory_stats", "device_count",
)

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare int means "CUDA device N" to torch factories; bool is an int but never a device.
    return isinstance(dev, int) and not isinstance(dev, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA device requests to the CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            # A mode is off while its handler runs, so the backward pass would run without it, and
            # megatron-core's linears allocate on "cuda" there (the fused weight-gradient path).
            # The autograd engine is called directly (as megatron-core's schedules do) under the mode.
            with self:
                return _backward(func, *args, **kwargs)
        return func(*args, **kwargs)


def _as_tuple(x) -> tuple:
    return () if x is None else (x,) if torch.is_tensor(x) else tuple(x)


def _backward(func, tensors, grad_tensors=None, retain_graph=None, create_graph=False, *rest, inputs=None, **kwargs):
    """``Tensor.backward(gradient, retain_graph, create_graph, inputs)`` and ``torch.autograd.backward
    (tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs)`` without their
    torch-function dispatch: the same grads (ones for a scalar when none is given), the same flags."""
    if func is torch.Tensor.backward:
        inputs = rest[0] if rest else inputs
    elif rest:  # autograd.backward's positional grad_variables (deprecated alias), then inputs
        grad_tensors = rest[0] if grad_tensors is None else grad_tensors
        inputs = rest[1] if len(rest) > 1 else inputs
    grad_tensors = kwargs.pop("gradient", kwargs.pop("grad_variables", grad_tensors))
    if kwargs:
        raise TypeError(f"backward() got unexpected arguments {sorted(kwargs)}")
    tensors = _as_tuple(tensors)
    grads = _as_tuple(grad_tensors) or (None,) * len(tensors)
    made = []
    for t, g in zip(tensors, grads):
        if g is None:
            if t.numel() != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
            g = torch.ones_like(t, memory_format=torch.preserve_format)
        made.append(g)
    from torch.autograd.variable import Variable

    Variable._execution_engine.run_backward(
        tensors, tuple(made), create_graph if retain_graph is None else retain_graph, create_graph,
        _as_tuple(inputs), allow_unreachable=True, accumulate_grad=True)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.device_count = lambda: 0


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state


def cpu_mode_active() -> bool:
    return _MODE is not None


def enable_cpu_mode() -> None:
    """Enter CPU mode for the rest of the process. A no-op when CUDA is available or already on."""
    global _MODE
    if _MODE is not None or torch.cuda.is_available():
        return
    _patch_torch_cuda()
    _patch_megatron_rng()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()


def disable_cpu_mode() -> None:
    """Leave the function mode (used by tests; torch.cuda patches stay, they are inert on CPU)."""
    global _MODE
    if _MODE is not None:
        _MODE.__exit__(None, None, None)
        _MODE = None
