import pytest
import torch
from _kernel_check import assert_same, rel_err

from bluelm_kernels import swiglu, swiglu_ref, use_triton

SHAPES = [(5, 2 * 96), (3, 4, 2 * 100), (1, 2 * 1100), (17, 2 * 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_formula(shape):
    x = torch.randn(shape)
    assert use_triton(x)
    f = shape[-1] // 2
    g, u = x[..., :f].double(), x[..., f:].double()
    assert rel_err(swiglu(x), g * torch.sigmoid(g) * u) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward(shape):
    assert_same(swiglu, swiglu_ref, [torch.randn(shape) * 3])


def test_odd_last_dim_rejected():
    with pytest.raises(ValueError):
        swiglu(torch.randn(2, 7))


def test_small_blocks(monkeypatch):
    from bluelm_kernels.swiglu import TUNE

    monkeypatch.setitem(TUNE, "block", 32)
    monkeypatch.setitem(TUNE, "bwd_block", 64)
    assert_same(swiglu, swiglu_ref, [torch.randn(3, 2 * 100)])


@pytest.mark.parametrize("rows", [2, 4])
def test_multi_row_tiles(monkeypatch, rows):
    # Row tiles with a row count that is not a multiple of the tile, and a column tail.
    from bluelm_kernels.swiglu import TUNE

    for pre in ("", "bwd_"):
        monkeypatch.setitem(TUNE, pre + "block", 32)
        monkeypatch.setitem(TUNE, pre + "rows", rows)
    assert_same(swiglu, swiglu_ref, [torch.randn(7, 2 * 100) * 3])
