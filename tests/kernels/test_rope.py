import pytest
import torch
from _kernel_check import assert_same, rel_err
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from bluelm_kernels import apply_rope, apply_rope_qk, apply_rope_qk_, apply_rope_ref, use_triton


def _freqs(s, b, rot, per_token):
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    if per_token:  # packed documents: every token its own position, per batch row
        pos = torch.randint(0, 64, (s, b)).float()
        f = pos[..., None] * inv
        return torch.cat([f, f], -1)[:, :, None, :]
    f = torch.arange(s).float()[:, None] * inv
    return torch.cat([f, f], -1)[:, None, None, :]


CASES = [  # s, b, heads, d, rot, per_token
    (5, 2, 3, 16, 16, False), (1, 1, 4, 8, 8, False), (7, 3, 5, 24, 16, True),
    (4, 2, 2, 100, 64, True), (3, 1, 1, 12, 12, True),
]


@pytest.mark.parametrize("case", CASES)
def test_matches_megatron(case):
    s, b, h, d, rot, per_token = case
    t, f = torch.randn(s, b, h, d), _freqs(s, b, rot, per_token)
    assert use_triton(t)
    want = _apply_rotary_pos_emb_bshd(t, f, rotary_interleaved=False)
    assert rel_err(apply_rope(t, f), want) < 1e-6
    assert rel_err(apply_rope_ref(t, f), want) < 1e-7


def test_general_freqs_halves():
    # freqs whose two halves differ: exercises the exact per-half formula and its transpose.
    t, f = torch.randn(3, 2, 2, 8), torch.randn(3, 2, 1, 8)
    assert rel_err(apply_rope(t, f), _apply_rotary_pos_emb_bshd(t, f)) < 1e-6
    assert_same(lambda a: apply_rope(a, f), lambda a: apply_rope_ref(a, f), [t])


@pytest.mark.parametrize("case", CASES)
def test_backward(case):
    s, b, h, d, rot, per_token = case
    f = _freqs(s, b, rot, per_token)
    assert_same(lambda a: apply_rope(a, f), lambda a: apply_rope_ref(a, f),
                [torch.randn(s, b, h, d)])


def test_non_contiguous_input():
    qkv = torch.randn(6, 2, 3, 3 * 16)  # a fused projection: q, k, v side by side
    t = qkv[..., 16:32]
    f = _freqs(6, 2, 16, True)
    assert not t.is_contiguous()
    assert rel_err(apply_rope(t, f), _apply_rotary_pos_emb_bshd(t, f)) < 1e-6


@pytest.mark.parametrize("ratio", [1, 4, 5])
@pytest.mark.parametrize("rot", [16, 12])
def test_qk_inplace_gqa(ratio, rot):
    s, b, nkv, d = 5, 2, 2, 16
    q0, k0 = torch.randn(s, b, nkv * ratio, d), torch.randn(s, b, nkv, d)
    f = _freqs(s, b, rot, True)

    def fused(q, k):
        q, k = q * 1.0, k * 1.0  # in-place needs non-leaf tensors
        out = apply_rope_qk_(q, k, f)
        assert out[0] is q and out[1] is k
        return out

    assert_same(fused, lambda q, k: (apply_rope_ref(q, f), apply_rope_ref(k, f)), [q0, k0])


@pytest.mark.parametrize("ratio", [1, 5])
@pytest.mark.parametrize("rot", [16, 12])
def test_qk_out_of_place_gqa(ratio, rot):
    # The model's path: q and k rotated into new tensors in one launch; backward one launch too.
    s, b, nkv, d = 5, 2, 2, 16
    q0, k0 = torch.randn(s, b, nkv * ratio, d), torch.randn(s, b, nkv, d)
    f = _freqs(s, b, rot, True)
    assert_same(lambda q, k: apply_rope_qk(q, k, f),
                lambda q, k: (apply_rope_ref(q, f), apply_rope_ref(k, f)), [q0, k0])


def test_qk_out_of_place_split_views_of_a_fused_projection():
    # torch.split outputs of a QKV buffer (multi-output views: in place is not allowed on them
    # under autograd); the rotated tensors are new, the buffer and its gradient are as the ref's.
    s, b, d = 4, 3, 16
    f = _freqs(s, b, 12, False)

    def run(rope):
        qkv = torch.randn(s, b, 6, d, generator=torch.Generator().manual_seed(0))
        qkv.requires_grad_()
        q, k, v = torch.split(qkv * 1.0, [4, 1, 1], dim=2)
        qr, kr = rope(q, k)
        (qr.square().sum() + (kr * 3).sum() + v.sum()).backward()
        return qr, kr, qkv.grad

    got = run(lambda q, k: apply_rope_qk(q, k, f))
    want = run(lambda q, k: (apply_rope_ref(q, f), apply_rope_ref(k, f)))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6


def test_qk_inplace_strided_views():
    s, b, d = 4, 3, 16
    buf = torch.randn(s, b, 4 + 1, d)  # 4 query heads and 1 key head in one buffer
    q, k = buf[:, :, :4], buf[:, :, 4:]
    want_q, want_k = apply_rope_ref(q, _freqs(s, b, d, False)), apply_rope_ref(k, _freqs(s, b, d, False))
    apply_rope_qk_(q, k, _freqs(s, b, d, False))
    assert rel_err(buf[:, :, :4], want_q) < 1e-6 and rel_err(buf[:, :, 4:], want_k) < 1e-6


def test_small_tiles_many_programs(monkeypatch):
    from bluelm_kernels.rope import TUNE

    monkeypatch.setitem(TUNE, "tokens", 2)  # 2 tokens a program: token masks and tails
    monkeypatch.setitem(TUNE, "bwd_tokens", 4)
    s, b = 7, 3
    q0, k0 = torch.randn(s, b, 4, 16), torch.randn(s, b, 1, 16)
    f = _freqs(s, b, 12, True)

    def fused(q, k):
        return apply_rope_qk_(q * 1.0, k * 1.0, f)

    assert_same(fused, lambda q, k: (apply_rope_ref(q, f), apply_rope_ref(k, f)), [q0, k0])


@pytest.mark.parametrize("nq,nk", [(6, 2), (5, 1), (8, 4), (12, 4)])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_head_steps(monkeypatch, nq, nk, heads):
    # Heads are rotated `heads` at a time (capped by the power of two dividing nq and nk):
    # several steps per program, steps of 1 for odd counts, token tails, rot < d.
    from bluelm_kernels.rope import TUNE

    for pre in ("", "bwd_"):
        monkeypatch.setitem(TUNE, pre + "heads", heads)
        monkeypatch.setitem(TUNE, pre + "tokens", 4)
    s, b = 5, 3
    q0, k0 = torch.randn(s, b, nq, 16), torch.randn(s, b, nk, 16)
    f = _freqs(s, b, 12, True)

    def fused(q, k):
        return apply_rope_qk_(q * 1.0, k * 1.0, f)

    assert_same(fused, lambda q, k: (apply_rope_ref(q, f), apply_rope_ref(k, f)), [q0, k0])
    assert_same(lambda a: apply_rope(a, f), lambda a: apply_rope_ref(a, f), [q0])


def test_model_rope_function_matches_megatron():
    # The attention's rope_fn of the fused backend (one launch for q and k) against megatron-core's
    # rotary (what the torch backend's rope_fn applies to each tensor), forward and backward, on
    # the views the attention passes (torch.split of the QKV projection).
    from megatron_bluelm.models.spec import _fused_rope

    s, b, d = 6, 2, 16
    f = _freqs(s, b, d, False)

    def each(q, k, freqs, config):
        return (_apply_rotary_pos_emb_bshd(q, freqs, rotary_interleaved=False),
                _apply_rotary_pos_emb_bshd(k, freqs, rotary_interleaved=False))

    def run(rope_fn):
        qkv = torch.randn(s, b, 6, d, generator=torch.Generator().manual_seed(1))
        qkv.requires_grad_()
        q, k, _ = torch.split(qkv * 1.0, [4, 1, 1], dim=2)
        qr, kr = rope_fn(q, k, f, None)
        (qr * torch.arange(d) + kr.square().sum(2, keepdim=True)).sum().backward()
        return qr, kr, qkv.grad

    for g, w in zip(run(_fused_rope), run(each)):
        assert rel_err(g, w) < 1e-6
