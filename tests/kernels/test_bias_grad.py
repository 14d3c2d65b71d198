"""bluelm_kernels.bias_grad under the Triton interpreter: column sums equal fp32 torch sums, in the
output dtype or added to an fp32 accumulator, over shapes that leave partial tiles and row ranges."""
import pytest
import torch

import bluelm_kernels.bias_grad as bg


@pytest.mark.parametrize("m,n", [(37, 300), (1, 5), (130, 256), (64, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_column_sum_matches_fp32_sum(m, n, dtype, monkeypatch):
    monkeypatch.setitem(bg.TUNE, "rows", 4)  # several row ranges a column strip, partial last tiles
    monkeypatch.setitem(bg.TUNE, "cols", 16)
    monkeypatch.setitem(bg.TUNE, "final_rows", 2)
    dy = torch.randn(m, n).to(dtype)
    got = bg.column_sum(dy)
    want = dy.float().sum(0)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-5)
    if dtype == torch.float32:
        assert torch.equal(got, bg.column_sum(dy)), "fixed partition and order: bit-identical"


def test_column_sum_of_leading_dims_and_strided_rows(monkeypatch):
    monkeypatch.setitem(bg.TUNE, "rows", 4)
    monkeypatch.setitem(bg.TUNE, "cols", 16)
    base = torch.randn(6, 5, 80)
    dy = base[:, :, 10:50]  # [6, 5, 40] rows 80 apart: read in place
    torch.testing.assert_close(bg.column_sum(dy), dy.sum((0, 1)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bg.column_sum(base.transpose(0, 1)), base.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_column_sum_into_accumulates_in_fp32(monkeypatch):
    monkeypatch.setitem(bg.TUNE, "rows", 4)
    monkeypatch.setitem(bg.TUNE, "cols", 16)
    acc = torch.randn(33)
    start = acc.clone()
    dys = [torch.randn(19, 33).bfloat16() for _ in range(3)]
    for dy in dys:
        assert bg.column_sum_into_(acc, dy) is acc
    want = start + sum(dy.float().sum(0) for dy in dys)  # no bf16 rounding of the sums
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-5)


def test_column_sum_into_rejects_a_wrong_accumulator():
    dy = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"contiguous fp32 \[8\]"):
        bg.column_sum_into_(torch.zeros(8, dtype=torch.bfloat16), dy)
    with pytest.raises(ValueError, match=r"contiguous fp32 \[8\]"):
        bg.column_sum_into_(torch.zeros(7), dy)


def test_programs_cover_the_rows():
    for m, n in [(21632, 1152), (21632, 4304), (7, 3), (1000, 100000)]:
        p, rows = bg._programs(m, n, torch.device("cpu"))
        assert rows % bg.TUNE["rows"] == 0 and (p - 1) * rows < m <= p * rows


@pytest.mark.parametrize("m,n", [(37, 300), (5, 40)])
@pytest.mark.parametrize("into", [False, True])
def test_gelu_backward_with_the_bias_gradient(m, n, into, monkeypatch):
    """dx = torch's GELU(tanh) backward, db = the column sums of dx (returned, or added to main_grad)."""
    monkeypatch.setitem(bg.TUNE, "rows", 4)
    monkeypatch.setitem(bg.TUNE, "cols", 16)
    x = torch.randn(m, n) * 3
    dg = torch.randn(m, n)
    want = bg.gelu_tanh_backward_ref(dg, x)
    acc = torch.randn(n) if into else None
    start = acc.clone() if into else None
    dx, db = bg.gelu_tanh_backward_bias(dg.view(m, 1, n), x.view(m, 1, n), torch.float32, acc)
    assert dx.shape == (m, 1, n)
    torch.testing.assert_close(dx.view(m, n), want, rtol=1e-5, atol=1e-5)  # tanh through sigmoid: ~1e-6
    if into:
        assert db is None
        torch.testing.assert_close(acc, start + want.sum(0), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(db, want.sum(0), rtol=1e-5, atol=1e-5)


def test_gelu_backward_bias_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="differ"):
        bg.gelu_tanh_backward_bias(torch.randn(3, 4), torch.randn(3, 5), torch.float32)
