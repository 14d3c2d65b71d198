"""megatron-core's no-Apex gradient norm / scale helpers replaced by device-side foreach versions
(training/model_setup.py): same values, and the norm reads nothing back to the host."""
import torch
from megatron.core import utils as mutils
from megatron.core.optimizer import clip_grads
from torch.overrides import TorchFunctionMode

from megatron_bluelm.parallel.cpu import enable_cpu_mode
from megatron_bluelm.training.model_setup import foreach_l2_norm, foreach_scale, use_foreach_grad_kernels


class _NoHostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("item", "__float__", "__int__", "__bool__", "tolist"):
            raise AssertionError(f"host read of a device value: {func.__name__}")
        return func(*args, **(kwargs or {}))


def _grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in ((300, 7), (5,), (64, 64), (1,))]


def test_norm_equals_megatron_and_reads_nothing_on_the_host():
    enable_cpu_mode()  # megatron-core's version puts its result on "cuda"
    grads = _grads()
    flag = torch.zeros(1, dtype=torch.int)
    want, _ = mutils.local_multi_tensor_l2_norm(2048, flag, [grads], False)
    with _NoHostReads():
        got, _ = foreach_l2_norm(2048, flag, [grads], False)
    assert got.shape == (1,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want.to(got.device), rtol=1e-6, atol=0)
    try:
        with _NoHostReads():
            mutils.local_multi_tensor_l2_norm(2048, flag, [grads], False)
    except AssertionError:
        pass
    else:
        raise AssertionError("the check does not see megatron-core's host read")
    assert foreach_l2_norm(2048, flag, [[]], False)[0].item() == 0.0


def test_scale_in_place_copy_and_scaled_copy():
    for same, scale in ((True, 0.25), (False, 1.0), (False, 3.0)):
        src = _grads(1)
        dst = src if same else [torch.zeros_like(t, dtype=torch.bfloat16) for t in src]
        want = [(t * scale).to(d.dtype) for t, d in zip(_grads(1), dst)]
        foreach_scale(2048, None, [src, dst], scale)
        for a, b in zip(dst, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_installed_where_megatron_falls_back():
    from megatron.core.optimizer import optimizer as moptimizer

    use_foreach_grad_kernels()
    assert clip_grads.l2_norm_impl is not mutils.local_multi_tensor_l2_norm
    assert clip_grads.multi_tensor_scale_impl is not mutils.local_multi_tensor_scale
    assert moptimizer.multi_tensor_scale_impl is not mutils.local_multi_tensor_scale
