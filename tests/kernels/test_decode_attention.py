"""The generation engine's decode kernels (bluelm_kernels/decode_attention.py) against their torch references,
under Triton's interpreter: split-K decode attention over per-row valid lengths (GQA groups of 1, 2,
5 heads; one and several key chunks) and RoPE + KV-cache write of megatron's grouped QKV layout."""
import pytest
import torch
from _kernel_check import rel_err

from bluelm_kernels.decode_attention import (
    decode_attention,
    decode_attention_ref,
    rope_and_cache,
    rope_and_cache_ref,
)


@pytest.mark.parametrize("group", [1, 2, 5])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention(group, splits):
    b, groups, cap, d = 4, 2, 150, 32
    q = torch.randn(b, groups * group, d)
    k, v = torch.randn(b, groups, cap, d), torch.randn(b, groups, cap, d)
    lengths = torch.tensor([1, 64, 65, 150])  # one key, a whole tile, a tile + 1, the full capacity
    out = decode_attention(q, k, v, lengths, splits)
    assert out.shape == q.shape and not out.isnan().any()
    assert rel_err(out, decode_attention_ref(q, k, v, lengths)) < 1e-5


def test_decode_attention_reads_only_valid_keys():
    b, cap, d = 2, 128, 16
    q, k, v = torch.randn(b, 4, d), torch.randn(b, 2, cap, d), torch.randn(b, 2, cap, d)
    lengths = torch.tensor([10, 100])
    before = decode_attention(q, k, v, lengths, 2)
    k[0, :, 10:], v[0, :, 10:] = float("nan"), float("nan")  # past row 0's length
    k[1, :, 100:], v[1, :, 100:] = 1e4, 1e4
    assert torch.equal(decode_attention(q, k, v, lengths, 2), before)


@pytest.mark.parametrize("heads,groups", [(4, 2), (10, 2), (4, 4)])
def test_rope_and_cache(heads, groups):
    rows, d, cap, slots = 3, 16, 40, 5
    qkv = torch.randn(rows, groups * (heads // groups + 2) * d)
    pos = torch.tensor([0, 17, 39])
    freqs = torch.outer(torch.arange(cap).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    caches = [torch.randn(slots, groups, cap, d) for _ in range(4)]
    kc, vc, kc_ref, vc_ref = caches[0], caches[1], caches[0].clone(), caches[1].clone()
    q = rope_and_cache(qkv, pos, cos, sin, kc, vc, heads, groups)
    q_ref = rope_and_cache_ref(qkv, pos, cos, sin, kc_ref, vc_ref, heads, groups)
    assert rel_err(q, q_ref) < 1e-6
    assert torch.allclose(kc, kc_ref, atol=1e-6) and torch.equal(vc, vc_ref)  # written where, and only there


def _fused_engine_vs_reference():
    """On a spawned rank (the interpreter is on: the engine's decode takes its fused-kernel path)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "inference"))
    from gen_workers import PROMPTS, _gen, _reference, _setup, model_overrides

    from bluelm_kernels.dispatch import use_triton

    im, engine = _setup(model_overrides())
    assert use_triton(torch.zeros(1)), "the fused path must be the one under test"
    outs = _gen(im, engine, PROMPTS, max_new_tokens=5)
    return [o.tokens for o in outs], _reference(im, PROMPTS, 5)


def test_engine_fused_decode_equals_reference():
    """The engine's CUDA decode path (Triton RMSNorm + residual, RoPE/cache kernel, decode kernel,
    SwiGLU), run by the interpreter, gives the reference loop's greedy tokens (fp32)."""
    from distributed import run_distributed

    ours, ref = run_distributed(_fused_engine_vs_reference, 1)[0]
    assert ours == ref


@pytest.mark.parametrize("heads,groups", [(4, 2), (10, 2)])
@pytest.mark.parametrize("splits", [1, 3])
def test_rope_cache_attention_equals_the_two_kernels(heads, groups, splits):
    """The fused launch (queries rotated from the QKV rows, the new key / value written by the program
    whose key chunk holds the position, then attention) = rope_and_cache + decode_attention: the same
    output and the same cache, keys at the new position included (positions 0, inside a chunk, at a
    chunk's last key, at the capacity's end)."""
    from bluelm_kernels.decode_attention import rope_cache_attention

    rows, d, cap, slots = 4, 16, 192, 6
    qkv = torch.randn(rows, groups * (heads // groups + 2) * d)
    pos = torch.tensor([0, 37, 63, cap - 1])
    freqs = torch.outer(torch.arange(cap).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    kc, vc = torch.randn(slots, groups, cap, d), torch.randn(slots, groups, cap, d)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = rope_cache_attention(qkv, pos + 1, cos, sin, kc, vc, heads, groups, splits)
    q = rope_and_cache(qkv, pos, cos, sin, kc_ref, vc_ref, heads, groups)
    ref = decode_attention(q, kc_ref[:rows], vc_ref[:rows], pos + 1, splits)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert rel_err(out, ref) < 1e-5
