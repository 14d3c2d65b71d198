"""Split-K decode matmuls (bluelm_kernels/split_k.py) and the kernels that sum their partials, under
Triton's interpreter: the partials add up to the product, RMSNorm / SwiGLU of the partials equal the
kernels on the rounded sum, and a whole decode step with split products equals the eager step."""
import os

import pytest
import torch

from bluelm_kernels import split_k
from bluelm_kernels.rmsnorm import rmsnorm_partials, rmsnorm_ref
from bluelm_kernels.swiglu import swiglu_partials, swiglu_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_partials_sum_to_the_product(dtype, splits):
    x, w = torch.randn(3, 64).to(dtype), torch.randn(40, 64).to(dtype)
    p = split_k.partials(x, w, splits)
    assert p.shape == (splits, 3, 40) and p.dtype == torch.float32
    want = x.double() @ w.double().t()
    assert torch.allclose(p.double().sum(0), want, atol=1e-4, rtol=1e-4)
    # each partial is its own K slice, not the whole product divided
    k = 64 // splits
    assert torch.allclose(p[-1].double(), x[:, -k:].double() @ w[:, -k:].double().t(), atol=1e-4)


def test_partials_reject_bad_shapes():
    with pytest.raises(ValueError, match="divide"):
        split_k.partials(torch.randn(2, 30), torch.randn(8, 30), 4)
    with pytest.raises(ValueError, match="contiguous"):
        split_k.partials(torch.randn(30, 2).t(), torch.randn(8, 30), 2)


def test_splits_for(monkeypatch):
    monkeypatch.setitem(split_k.TUNE, "proj", 4)
    monkeypatch.setitem(split_k.TUNE, "max_rows", 8)
    assert split_k.splits_for("proj", 8, 2560) == 4
    assert split_k.splits_for("proj", 9, 2560) == 1  # many rows: the partials cost more than they save
    assert split_k.splits_for("proj", 1, 2561) == 1  # K not divisible
    assert split_k.splits_for("proj", 1, 4 * 12) == 1  # pieces of 12 elements: not whole 16-byte vectors


@pytest.mark.parametrize("parts", [1, 2, 4])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_of_partials(parts, with_residual):
    p = torch.randn(parts, 5, 96)
    w = torch.randn(96).to(torch.bfloat16)
    r = torch.randn(5, 96).to(torch.bfloat16) if with_residual else None
    got = rmsnorm_partials(p, w, 1e-5, residual=r, dtype=torch.bfloat16)
    want = rmsnorm_ref(p.sum(0).to(torch.bfloat16), w, 1e-5, r)
    got, want = (got, want) if with_residual else ((got,), (want,))
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=1e-2), (a - b).abs().max()


def test_rmsnorm_partials_rejects_bf16():
    with pytest.raises(ValueError, match="fp32 partials"):
        rmsnorm_partials(torch.randn(2, 3, 8).to(torch.bfloat16), torch.ones(8))


@pytest.mark.parametrize("parts", [1, 3])
def test_swiglu_of_partials(parts):
    p = torch.randn(parts, 4, 2 * 100)
    got = swiglu_partials(p, torch.bfloat16)
    # fp32 math on the rounded sum; Triton's interpreter truncates each fp32 -> bf16 conversion
    # (the GPU rounds to nearest), so gate, up and the output may each lose up to 1 bf16 ulp (2^-7)
    want = swiglu_ref(p.sum(0).to(torch.bfloat16).float())
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, atol=1e-2, rtol=3 * 2 ** -7), (got.float() - want).abs().max()


def _stage(dtype):
    """A decoder stage of random weights (heads 4, KV groups 2, head dim 16, hidden 64, FFN 96)."""
    from megatron_bluelm.inference.stage import LayerWeights, StageWeights

    torch.manual_seed(0)
    w = StageWeights.__new__(StageWeights)
    w.tp, w.tp_group, w.heads, w.groups, w.head_dim, w.hidden, w.eps = 1, None, 4, 2, 16, 64, 1e-5
    w.dtype, w.device = dtype, torch.device("cpu")
    w.inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))

    def rnd(*s):
        return (torch.randn(*s) / s[-1] ** 0.5).to(dtype)

    qkv_rows = (w.heads + 2 * w.groups) * w.head_dim
    w.layers = [LayerWeights(1 + 0.1 * rnd(64), rnd(qkv_rows, 64), rnd(64, 64), 1 + 0.1 * rnd(64),
                             rnd(2 * 96, 64), rnd(64, 96)) for _ in range(2)]
    return w


def test_split_decode_step_equals_the_eager_step(monkeypatch):
    """fp32: the interpreter's bf16 decode attention is not exact (the GPU benchmark's --check covers bf16)."""
    from megatron_bluelm.inference.kv_cache import KVCache

    dtype = torch.float32
    w = _stage(dtype)
    rows, capacity = 3, 24
    cos, sin = w.rope_tables(capacity)
    pos = torch.tensor([4, 9, 0])
    x = torch.randn(rows, 64).to(dtype)
    base = KVCache(2, rows, 2, capacity, 16, dtype, torch.device("cpu"))
    base.k.normal_(), base.v.normal_()

    def step(env_off: bool, tune: dict):
        cache = KVCache(2, rows, 2, capacity, 16, dtype, torch.device("cpu"))
        cache.k.copy_(base.k), cache.v.copy_(base.v)
        for key, val in tune.items():
            monkeypatch.setitem(split_k.TUNE, key, val)
        monkeypatch.setenv("BLUELM_DISABLE_TRITON", "1" if env_off else "0")
        return w.decode(x.clone(), pos, cache, cos, sin, rows), cache

    eager, c0 = step(True, {})
    split, c1 = step(False, {"proj": 4, "fc1": 2, "fc2": 4, "max_rows": 8})
    plain, _ = step(False, {"proj": 1, "fc1": 1, "fc2": 1})
    tol = 1e-4
    assert torch.allclose(split.float(), eager.float(), atol=tol, rtol=tol), (split.float() - eager.float()).abs().max()
    assert torch.allclose(split.float(), plain.float(), atol=tol, rtol=tol)
    assert torch.allclose(c1.k.float(), c0.k.float(), atol=tol) and torch.allclose(c1.v.float(), c0.v.float(), atol=tol)
    assert os.environ.get("BLUELM_DISABLE_TRITON") == "0"
