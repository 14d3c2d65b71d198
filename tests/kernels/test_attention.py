import pytest
import torch
from _kernel_check import assert_same, rel_err

from bluelm_kernels import attention, attention_ref


def _qkv(b, nq, nkv, s, d):
    return torch.randn(b, nq, s, d), torch.randn(b, nkv, s, d), torch.randn(b, nkv, s, d)


def _doc_ids(b, s):
    cuts = torch.rand(b, s) < 0.25  # a new document starts where True
    cuts[:, 0] = False
    return cuts.long().cumsum(-1)


@pytest.mark.parametrize("ratio", [1, 4, 5])
@pytest.mark.parametrize("causal", [True, False])
def test_plain(ratio, causal):
    q, k, v = _qkv(2, 2 * ratio, 2, 9, 16)
    assert_same(lambda a, b, c: attention(a, b, c, causal=causal),
                lambda a, b, c: attention_ref(a, b, c, causal=causal), [q, k, v])


@pytest.mark.parametrize("ratio", [1, 4, 5])
@pytest.mark.parametrize("causal", [True, False])
def test_documents(ratio, causal):
    q, k, v = _qkv(2, 2 * ratio, 2, 13, 8)
    ids = _doc_ids(2, 13)
    assert_same(lambda a, b, c: attention(a, b, c, causal=causal, document_ids=ids, scale=0.3),
                lambda a, b, c: attention_ref(a, b, c, causal=causal, document_ids=ids, scale=0.3),
                [q, k, v])


def test_documents_equal_separate_sequences():
    # Independent check: packed attention == attention over each document on its own.
    q, k, v = _qkv(1, 4, 2, 12, 8)
    ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3])
    out = attention(q, k, v, causal=True, document_ids=ids)
    start = 0
    for n in (5, 4, 3):
        sl = slice(start, start + n)
        alone = attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], causal=True)
        assert rel_err(out[:, :, sl], alone) < 1e-6
        start += n


def test_single_token():
    q, k, v = _qkv(1, 4, 1, 1, 8)
    assert rel_err(attention(q, k, v), v.expand(1, 4, 1, 8)) < 1e-6
