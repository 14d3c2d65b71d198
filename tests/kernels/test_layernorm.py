"""bluelm_kernels.layernorm under the Triton interpreter: forward and the x / weight / bias gradients
against the fp32 reference and an fp64 formula, the backward's dW / dB sums (atomic in-kernel and
the deterministic two-kernel sum), the ViT's hidden size 1152 and odd ones, and bad input."""
import sys
import types

import pytest
import torch
from _kernel_check import assert_same, rel_err

from bluelm_kernels import layernorm, layernorm_ref, rmsnorm, rmsnorm_ref, use_triton


def _mod():
    return sys.modules["bluelm_kernels.layernorm"]


def _inputs(shape, dtype=torch.float32, pdtype=None):
    h = shape[-1]
    x = torch.randn(shape) * 2 + 0.5  # a mean away from 0: the centring matters
    w, b = torch.rand(h) + 0.5, torch.randn(h)
    return x.to(dtype), w.to(pdtype or dtype), b.to(pdtype or dtype)


def _grads(fn, x, w, b, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = fn(*leaves)
    return (y, *torch.autograd.grad(y, leaves, dy))


def _tune(monkeypatch, **kv):
    for k, v in kv.items():
        monkeypatch.setitem(_mod().TUNE, k, v)


@pytest.mark.parametrize("shape", [(5, 1152), (3, 7, 100), (2, 1, 33), (1, 257)])
@pytest.mark.parametrize("split", [0, 1])
def test_matches_reference_fp32(monkeypatch, shape, split):
    # 1152 = 1024 + 128 (split) or one 2048 block; 100, 33, 257: odd sizes and padding of both parts
    _tune(monkeypatch, fwd_split=split, bwd_split=split)
    x, w, b = _inputs(shape)
    assert use_triton(x)
    assert_same(lambda a, c, d: layernorm(a, c, d, 1e-6), lambda a, c, d: layernorm_ref(a, c, d, 1e-6), [x, w, b])
    xd = x.double()
    want = (xd - xd.mean(-1, keepdim=True)) / (xd.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    assert rel_err(layernorm(x, w, b, 1e-6), want * w.double() + b.double()) < 1e-6


def test_saves_fp32_row_statistics():
    x, w, b = _inputs((3, 4, 100))
    y = layernorm(x.requires_grad_(), w, b, 1e-6)
    _, _, mean, rstd = y.grad_fn.saved_tensors
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (12,)
    torch.testing.assert_close(mean, x.detach().reshape(12, 100).mean(-1))
    torch.testing.assert_close(rstd, 1 / (x.detach().reshape(12, 100).var(-1, unbiased=False) + 1e-6).sqrt())


@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float32])
def test_bf16_activations(pdtype):
    # bf16 x (the ViT's activations) with bf16 or fp32 parameters: y and dx in bf16, dW / dB in the
    # parameters' dtype; against the reference (fp32 math on the same bf16 inputs, rounded once):
    # within 1e-2 relative (a few bf16 roundings; the interpreter rounds fp32 -> bf16 its own way).
    x, w, b = _inputs((9, 1152), torch.bfloat16, pdtype)
    dy = torch.randn(9, 1152).to(torch.bfloat16)
    got = _grads(lambda *a: layernorm(*a, 1e-6), x, w, b, dy)
    want = _grads(lambda *a: layernorm_ref(*a, 1e-6), x, w, b, dy)
    for name, g, r, dt in zip(("y", "dx", "dw", "db"), got, want, (x.dtype, x.dtype, pdtype, pdtype)):
        assert g.dtype == dt, name
        assert rel_err(g, r) < 1e-2, f"{name}: {rel_err(g, r)}"


@pytest.mark.parametrize("atomic", [0, 1])
@pytest.mark.parametrize("m,rows,programs,split,stages", [(37, 4, 3, 1, 3), (50, 1, 40, 0, 1), (5, 4, 1, 1, 1),
                                                          (9, 1, 9, 1, 3)])
def test_backward_partial_sums(monkeypatch, atomic, stages, m, rows, programs, split):
    # Several row tiles per program (grid-stride), rows not a multiple of the tile, programs with
    # unequal tile counts, one padded block or two column parts (H = 100: 64 + 64), the loop as
    # written or handed to the pipeliner (stages; the same program under the interpreter); dW / dB
    # summed in the kernel or by the second one.
    _tune(monkeypatch, bwd_dw_atomic=atomic, bwd_stages=stages, bwd_rows=rows, bwd_programs_cpu=programs,
          bwd_split=split, fwd_rows=8 // rows)
    x, w, b = _inputs((m, 100))
    assert_same(lambda a, c, d: layernorm(a, c, d, 1e-6), lambda a, c, d: layernorm_ref(a, c, d, 1e-6), [x, w, b])


def test_deterministic_sum_equals_atomic_and_repeats(monkeypatch):
    # torch.use_deterministic_algorithms(True) selects the [2, programs, H] partials + fixed-order sum
    # (two _sum_rows launches: dW, dB): the same gradients as the one-launch atomic sum, bit-identical
    # from call to call.
    mod = _mod()
    _tune(monkeypatch, bwd_programs_cpu=5, bwd_rows=1)
    x, w, b = _inputs((13, 200))
    dy = torch.randn(13, 200)
    atomic = _grads(lambda *a: layernorm(*a, 1e-6), x, w, b, dy)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    calls = []
    real = mod._sum_rows
    monkeypatch.setattr(mod, "_sum_rows", lambda p, d: calls.append(tuple(p.shape)) or real(p, d))
    det = [_grads(lambda *a: layernorm(*a, 1e-6), x, w, b, dy) for _ in range(2)]
    assert calls == [(5, 200)] * 4
    for name, a, d0, d1 in zip(("y", "dx", "dw", "db"), atomic, *det):
        assert torch.equal(d0, d1), name
        assert rel_err(d0, a) < 1e-6, name


def test_atomic_workspace_is_left_zeroed_and_shared_with_rmsnorm(monkeypatch):
    # The one-launch backward's [dW | dB] accumulator is rmsnorm's workspace of 2H: each kernel must
    # hand it back zeroed, or a later call (either op) would add the previous call's sums.
    _tune(monkeypatch, bwd_dw_atomic=1)
    rms = sys.modules["bluelm_kernels.rmsnorm"]
    monkeypatch.setitem(rms.TUNE, "bwd_dw_atomic", 1)
    x, w, b = _inputs((11, 48))
    xr, wr = torch.randn(7, 96), torch.rand(96) + 0.5
    for _ in range(2):
        assert_same(lambda a, c, d: layernorm(a, c, d, 1e-6), lambda a, c, d: layernorm_ref(a, c, d, 1e-6),
                    [x, w, b])
        assert_same(rmsnorm, rmsnorm_ref, [xr, wr])
    acc, counter = rms._dw_workspace(x.device, 96)
    assert torch.count_nonzero(acc) == 0 and counter.item() == 0


def test_strided_rows_and_broadcast_gradient():
    # x a column slice of a wider tensor (row stride != H, read in place) and dy of y.sum() (stride 0)
    wide = torch.randn(6, 130) + 1
    x = wide[:, :100].clone().requires_grad_()
    xs = wide.clone().requires_grad_()
    w, b = torch.rand(100) + 0.5, torch.randn(100)
    layernorm(xs[:, :100], w, b, 1e-6).sum().backward()
    layernorm_ref(x, w, b, 1e-6).sum().backward()
    assert rel_err(xs.grad[:, :100], x.grad) < 1e-5 and torch.count_nonzero(xs.grad[:, 100:]) == 0
    torch.testing.assert_close(layernorm(xs[:, :100], w, b, 1e-6), layernorm_ref(x, w, b, 1e-6))


def test_bad_input_is_rejected(monkeypatch):
    x, w, b = _inputs((4, 64))
    with pytest.raises(ValueError, match=r"weight must be a floating \[64\] tensor .*got torch.float32 \(63,\)"):
        layernorm(x, w[:63], b)
    with pytest.raises(ValueError, match=r"bias must be a floating \[64\] tensor .*got None"):
        layernorm(x, w, None)
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        layernorm(x.long(), w, b)
    with pytest.raises(ValueError, match="bias is on meta, x on cpu"):
        layernorm(x, w, b.to("meta"))
    monkeypatch.setattr(_mod(), "MAX_H", 32)
    with pytest.raises(ValueError, match=r"hidden size 64 > 32 \(MAX_H, bluelm_kernels/layernorm.py\)"):
        layernorm(x, w, b)


def test_empty_input():
    x, w, b = _inputs((0, 3, 64))
    assert layernorm(x, w, b).shape == (0, 3, 64)


def test_vit_norm_module_runs_the_kernel(monkeypatch):
    # The fused backend's ViT norm (models/vision.py) calls the kernel where Triton runs, with the
    # torch backend's parameter names and result.
    from megatron_bluelm.models.vision import FusedLayerNorm, LayerNorm

    calls = []
    real = _mod()._LayerNorm.apply
    monkeypatch.setattr(_mod()._LayerNorm, "apply", lambda *a: calls.append(1) or real(*a))
    cfg = types.SimpleNamespace(params_dtype=torch.float32, sequence_parallel=False)
    fused, ref = FusedLayerNorm(cfg, 100, 1e-6), LayerNorm(cfg, 100, 1e-6)
    assert [n for n, _ in fused.named_parameters()] == ["weight", "bias"]
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.normal_()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(13, 3, 100)
    assert_same(fused, ref, [x])
    assert calls


@pytest.mark.parametrize("shape", [(5, 1152), (3, 7, 100)])
@pytest.mark.parametrize("split", [0, 1])
def test_residual_add_and_passthrough_equal_their_composition(monkeypatch, shape, split):
    """layernorm(x, residual=r) = (LN(x + r), x + r) and layernorm_passthrough(x) = (LN(x), x): outputs
    and every input gradient, the gradient reaching the second output included (added in the kernel)."""
    _tune(monkeypatch, fwd_split=split, bwd_split=split)
    x, w, b = _inputs(shape)
    r = torch.randn(shape)
    assert_same(lambda a, c, d, e: layernorm(a, c, d, 1e-6, residual=e),
                lambda a, c, d, e: (layernorm_ref(a + e, c, d, 1e-6), a + e), [x, w, b, r])
    assert_same(lambda a, c, d: _mod().layernorm_passthrough(a, c, d, 1e-6),
                lambda a, c, d: (layernorm_ref(a, c, d, 1e-6), a), [x, w, b])


def test_bf16_residual_sum_is_what_the_norm_sees():
    x, w, b = _inputs((4, 100), torch.bfloat16, torch.float32)
    r = torch.randn(4, 100).bfloat16()
    y, s = layernorm(x, w, b, 1e-6, residual=r)
    # the interpreter rounds fp32 -> bf16 its own way (GPUs: to nearest even, as torch's add)
    torch.testing.assert_close(s, x + r)
    assert torch.equal(y, layernorm(s, w, b, 1e-6))  # the norm of the rounded sum it returns


def test_passthrough_gradient_joins_in_the_norm_backward():
    x, w, b = _inputs((3, 100))
    x.requires_grad_()
    y, x2 = _mod().layernorm_passthrough(x, w, b, 1e-6)
    assert torch.equal(x2, x) and x2.grad_fn is y.grad_fn  # one backward node: no autograd add
    with pytest.raises(ValueError, match="residual"):
        layernorm(x, w, b, 1e-6, residual=torch.randn(3, 99))
