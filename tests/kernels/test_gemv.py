"""kernels/gemv.py (the decode step's few-row products) against its torch reference under Triton's
interpreter: plain, RMSNorm in front (with and without the residual add, whose sum is returned), the
SwiGLU after the fused [gate; up] product, 1..8 rows, K not a multiple of the tile, N not a multiple
of the rows per program; and every launch shape the tuner may pick."""
import pytest
import torch
from _kernel_check import rel_err

from kernels import gemv as gv


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("variant", ["plain", "norm", "norm_residual", "norm_residual_swiglu", "norm_swiglu"])
def test_gemv_matches_reference(rows, variant):
    k, n = 200, 70  # neither a multiple of any tile
    x = torch.randn(rows, k)
    w = torch.randn(2 * n if "swiglu" in variant else n, k) / k ** 0.5
    kw = {}
    if "norm" in variant:
        kw["norm"] = (torch.rand(k) + 0.5, 1e-5)
    if "residual" in variant:
        kw["residual"] = torch.randn(rows, k)
    kw["swiglu"] = "swiglu" in variant
    out, ref = gv.gemv(x, w, **kw), gv.gemv_ref(x, w, **kw)
    if "residual" in variant:
        assert torch.equal(out[1], ref[1])  # the new residual stream: exact
        out, ref = out[0], ref[0]
    assert out.shape == ref.shape == (rows, n)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("cfg", gv.CANDIDATES)
def test_every_launch_shape(cfg):
    x, w = torch.randn(2, 300), torch.randn(2 * 33, 300)
    g = (torch.rand(300) + 0.5, 1e-5)
    r = torch.randn(2, 300)
    y, s = torch.empty(2, 33), torch.empty(2, 300)
    gv._launch(cfg, x, w, y, s, g[0], r, 33, 1e-5, True, True, True)
    ref, ref_s = gv.gemv_ref(x, w, norm=g, residual=r, swiglu=True)
    assert rel_err(y, ref) < 1e-5 and torch.equal(s, ref_s)


def test_bf16_rounding_matches_the_unfused_kernels():
    """In bf16 the fused path rounds where the rmsnorm / swiglu kernels round: the residual sum has the
    rmsnorm kernel's bits, the output matches those kernels around a matmul up to summation order.
    (Both run under the interpreter, whose fp32 -> bf16 conversion is its own.)"""
    from kernels.rmsnorm import rmsnorm
    from kernels.swiglu import swiglu

    torch.manual_seed(1)
    x, r = torch.randn(1, 256).bfloat16(), torch.randn(1, 256).bfloat16()
    g, w = (torch.rand(256) + 0.5).bfloat16(), (torch.randn(64, 256) / 16).bfloat16()
    y, s = gv.gemv(x, w, norm=(g, 1e-5), residual=r, swiglu=True)
    h, s_ref = rmsnorm(x, g, 1e-5, residual=r)
    ref = swiglu((h.float() @ w.float().t()).bfloat16())
    assert torch.equal(s, s_ref)
    assert (y.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()


def test_more_rows_than_the_kernel_takes_use_the_reference():
    x, w = torch.randn(gv.MAX_ROWS + 1, 64), torch.randn(16, 64)
    assert torch.allclose(gv.gemv(x, w), x @ w.t())


def test_residual_without_norm_is_refused():
    with pytest.raises(ValueError, match="residual"):
        gv.gemv(torch.randn(1, 8), torch.randn(4, 8), residual=torch.randn(1, 8))
