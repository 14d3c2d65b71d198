"""The CPU stand-ins for megatron-core's CUDA calls (megatron_bluelm/parallel/cpu.py).

The first test fails when a megatron-core upgrade renames or removes something we patch, instead of
letting a CUDA call slip through on CPU machines."""
import importlib

import torch
from distributed import run_distributed

from megatron_bluelm.parallel import cpu


def test_patched_megatron_names_exist():
    for module, name in cpu.PATCHED_MEGATRON_NAMES:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone: update parallel/cpu.py"
    for name in cpu.PATCHED_TORCH_CUDA_NAMES:
        assert hasattr(torch.cuda, name), f"torch.cuda.{name} is gone: update parallel/cpu.py"


def _cpu_mode_checks():
    from megatron.core import tensor_parallel

    from megatron_bluelm.parallel.cpu import cpu_mode_active
    from megatron_bluelm.parallel.setup import init_distributed, init_model_parallel

    init_distributed()  # enters CPU mode (no CUDA here)
    init_model_parallel(tp=1, pp=1)
    out = {"active": cpu_mode_active()}
    out["zeros_device"] = str(torch.zeros(2, device="cuda").device)
    out["int_device"] = str(torch.empty(2, device=torch.cuda.current_device()).device)
    out["to_cuda"] = str(torch.ones(2).cuda().device) + "," + str(torch.ones(2).to("cuda").device)
    out["type_name"] = torch.ones(2).type() + "," + torch.ones(2, dtype=torch.bfloat16).type()
    out["type_cast"] = torch.ones(2).type(torch.float64).dtype == torch.float64
    # The model-parallel RNG tracker forks a separate stream and restores the default one.
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    torch.manual_seed(0)
    expected_default = torch.rand(3)
    torch.manual_seed(0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.rand(3)
    after = torch.rand(3)
    out["fork_differs"] = not torch.equal(forked, expected_default)
    out["default_restored"] = torch.equal(after, expected_default)
    # Backward passes run under the mode too (megatron-core's fused weight-gradient path allocates on
    # "cuda" inside a backward), whichever way they are started.
    x = torch.randn(3, requires_grad=True)
    _AllocatesInBackward.apply(x).sum().backward()
    y = torch.randn(2, 3, requires_grad=True)
    torch.autograd.backward([_AllocatesInBackward.apply(y)], [torch.full((2, 3), 2.0)])
    z = torch.randn(3, requires_grad=True)
    (_AllocatesInBackward.apply(z) * 3).backward(torch.ones(3), inputs=[z])
    out["backward_grads"] = [x.grad.tolist(), y.grad.tolist(), z.grad.tolist()]
    return out


class _AllocatesInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g + torch.zeros(g.shape, device=torch.cuda.current_device())


def test_cpu_mode_maps_cuda_to_cpu_and_forks_rng():
    out = run_distributed(_cpu_mode_checks, 1)[0]
    assert out["active"]
    assert out["zeros_device"] == "cpu" and out["int_device"] == "cpu"
    assert out["to_cuda"] == "cpu,cpu"
    assert out["type_name"] == "torch.cuda.FloatTensor,torch.cuda.BFloat16Tensor"
    assert out["type_cast"]
    assert out["fork_differs"] and out["default_restored"]
    assert out["backward_grads"] == [[1.0] * 3, [[2.0] * 3] * 2, [3.0] * 3]
