"""Which kernel a packed micro-batch takes, and what is computed once per micro-batch.

The variable-length flash path runs on CUDA only; here its plumbing (folding [b, heads, s, d] rows
into one token stream, cumulative lengths split at row ends, GQA, the autograd Function) runs on CPU
against stand-ins for ``aten._flash_attention_forward`` / ``_backward`` that compute each document's
attention with the reference."""
import sys

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from bluelm_kernels.attention import PATHS, attention, attention_ref, document_block_mask, document_layout


def _segments(cu):
    cu = cu.tolist()
    return list(zip(cu[:-1], cu[1:]))


def _ref_segment(q, k, v, causal, scale):
    # [L, heads, d] -> the reference on [1, heads, L, d]
    t = [x.transpose(0, 1)[None] for x in (q, k, v)]
    return attention_ref(*t, causal=causal, scale=scale)[0].transpose(0, 1)


def fake_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, scale=None):
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and cu_q.dtype == torch.int32
    assert cu_q is cu_k and max_q == max_k and dropout == 0.0
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max(lengths) == max_q and int(cu_q[-1]) == q.shape[0]
    out = torch.cat([_ref_segment(q[a:b], k[a:b], v[a:b], causal, scale) for a, b in _segments(cu_q)])
    return out, torch.zeros(q.shape[1], q.shape[0]), torch.zeros(2), torch.empty(0), torch.empty(0)


def fake_flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout, causal, rng, unused,
                        scale=None):
    assert dout.is_contiguous() and dout.shape == out.shape
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for a, b in _segments(cu_q):
        with torch.enable_grad():
            leaves = [t[a:b].detach().requires_grad_(True) for t in (q, k, v)]
            o = _ref_segment(*leaves, causal, scale)
            for g, piece in zip(grads, torch.autograd.grad(o, leaves, dout[a:b])):
                g[a:b] = piece
    return tuple(grads)


@pytest.fixture
def fake_varlen(monkeypatch):
    attn_mod = sys.modules["bluelm_kernels.attention"]  # the module (the package re-exports the function by its name)
    monkeypatch.setattr(attn_mod, "_VARLEN_CHECKED", {})
    monkeypatch.setattr(attn_mod, "varlen_usable", lambda q, k: True)
    monkeypatch.setattr(attn_mod, "_flash_forward", fake_flash_forward)
    monkeypatch.setattr(attn_mod, "_flash_backward", fake_flash_backward)


def test_layout_splits_runs_at_row_ends():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [2, 2, 2, 2, 3, 3]])  # id 2 ends row 0 and starts row 1
    lay = document_layout(ids)
    assert lay.cu_seqlens.tolist() == [0, 2, 5, 6, 10, 12] and lay.max_len == 4
    assert lay.sorted and not lay.single
    assert document_layout(torch.tensor([[3, 3, 3], [0, 0, 0]])).single
    assert not document_layout(torch.tensor([[0, 1, 0]])).sorted


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_path_equals_reference(fake_varlen, causal):
    b, s, nq, nkv, d = 2, 24, 6, 2, 8
    # megatron's [s, b, heads, d] activations, permuted to [b, heads, s, d] as SDPACoreAttention does
    q0, k0, v0 = (torch.randn(s, b, n, d, requires_grad=True) for n in (nq, nkv, nkv))
    ids = torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [2] * 3 + [3] * 21])
    grad = torch.randn(b, nq, s, d)

    def run(fn):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q0, k0, v0))
        out = fn(q, k, v)
        dq, dk, dv = torch.autograd.grad(out, (q0, k0, v0), grad)
        return out, dq, dk, dv

    before = PATHS["varlen"]
    ours = run(lambda q, k, v: attention(q, k, v, causal=causal, document_ids=ids, scale=0.4))
    assert PATHS["varlen"] == before + 1
    ref = run(lambda q, k, v: attention_ref(q, k, v, causal=causal, document_ids=ids, scale=0.4))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_rows_of_one_document_take_plain_sdpa(fake_varlen):
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    ids = torch.tensor([[5] * 16, [0] * 16])
    before = dict(PATHS)
    out = attention(q, k, v, causal=True, document_ids=ids)
    assert PATHS["sdpa"] == before.get("sdpa", 0) + 1
    assert PATHS["varlen"] == before.get("varlen", 0) and PATHS["dense"] == before.get("dense", 0)
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=True, document_ids=ids))


def test_cpu_takes_the_exact_mask_and_builds_the_layout_once():
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    ids = torch.tensor([[0] * 9 + [1] * 7])
    before = dict(PATHS)
    for _ in range(3):  # three layers, one micro-batch
        out = attention(q, k, v, causal=True, document_ids=ids.detach())
    assert PATHS["layout"] == before.get("layout", 0) + 1
    assert PATHS["dense"] == before.get("dense", 0) + 3
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=True, document_ids=ids))


def test_flex_does_not_recompile_across_document_counts():
    # The block masks of different micro-batches differ only in tensor values, never in shapes or
    # Python constants, so the compiled flex_attention is traced once for a given (b, s).
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    flex = torch.compile(flex_attention, dynamic=False, backend="eager")
    q, k, v = torch.randn(1, 2, 256, 16), torch.randn(1, 1, 256, 16), torch.randn(1, 1, 256, 16)
    for n_docs in (1, 3, 7, 20):
        ids = (torch.arange(256) * n_docs // 256)[None]
        out = flex(q, k, v, block_mask=document_block_mask(ids), enable_gqa=True)
        torch.testing.assert_close(out, attention_ref(q, k, v, causal=True, document_ids=ids), rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_a_kernel_that_fails_its_check_is_not_used(fake_varlen, monkeypatch, caplog):
    attn_mod = sys.modules["bluelm_kernels.attention"]

    def wrong_gqa(q, k, v, *args, **kwargs):  # K/V heads shared the other way round than the reference's
        ratio = q.shape[1] // k.shape[1]
        return fake_flash_forward(q, k.repeat(1, ratio, 1)[:, :q.shape[1]], v.repeat(1, ratio, 1)[:, :q.shape[1]],
                                  *args, **kwargs)

    monkeypatch.setattr(attn_mod, "_flash_forward", wrong_gqa)
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    ids = torch.tensor([[0] * 9 + [1] * 7])
    before = PATHS["varlen"]
    with caplog.at_level("WARNING", logger="bluelm_kernels.attention"):
        out = attention(q, k, v, causal=True, document_ids=ids)
    assert PATHS["varlen"] == before and "differs from the reference" in caplog.text
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=True, document_ids=ids))


def test_block_mask_built_once_per_micro_batch():
    from bluelm_kernels.attention import cached_document_block_mask

    ids = torch.tensor([[0] * 100 + [1] * 156])
    before = PATHS["block_mask"]
    masks = {id(cached_document_block_mask(ids.detach())) for _ in range(4)}  # four layers, or recomputation
    assert len(masks) == 1 and PATHS["block_mask"] == before + 1
