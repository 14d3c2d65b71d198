"""The generation engine's decode kernels (bluelm_kernels/decode_attention.py) against their torch references,
under Triton's interpreter: split-K decode attention over per-row valid lengths (GQA groups of 1, 2,
5 heads; one and several key chunks, several merged inside the decode kernel by the last-arriving
chunk program, with arrival counters reused and reset across calls) and RoPE + KV-cache write of
megatron's grouped QKV layout."""
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


def _rope_tables(cap, d):
    freqs = torch.outer(torch.arange(cap).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


# (groups, heads per group, capacity, splits, keys per tile, lengths): chunk = 64 keys unless said
_MERGE_CASES = {
    # one key (two empty chunks), exactly chunk 0's end, exactly chunk 1's end, the full capacity
    "boundaries": (2, 5, 192, 3, 64, [1, 64, 128, 192]),
    # the engine's batch-1 shape (4 groups x 5 heads, 6 chunks of a 384-slot cache), three rows
    "engine_shape": (4, 5, 384, 6, 64, [1, 193, 384]),
    # chunk 3 starts past the capacity (150 keys in 4 x 64): always empty; a chunk + 1
    "past_capacity": (2, 2, 150, 4, 64, [65, 150]),
    # 32-key tiles, 10 chunks (the benchmark's other tile size)
    "tile32": (1, 5, 320, 10, 32, [1, 32, 33, 320]),
    # 16-key tiles, 18 chunks: more chunks than the merge's tile holds (16 at 5 heads), so it loops
    "tile16_many_chunks": (1, 5, 288, 18, 16, [1, 16, 17, 288]),
}


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("case", list(_MERGE_CASES))
def test_fused_merge_equals_reference(case, rope):
    """Several chunks merged inside the decode kernel by the last-arriving chunk program (no combine
    launch) = the torch reference, for chunk-boundary lengths, empty chunks and the full capacity, with
    and without the fused RoPE + cache write; the two-kernel path (the benchmark's baseline) as well."""
    from bluelm_kernels.decode_attention import _decode_attention_triton

    groups, group, cap, splits, block_n, lengths = _MERGE_CASES[case]
    rows, heads, d = len(lengths), groups * group, 16
    lengths = torch.tensor(lengths)
    kc, vc = torch.randn(rows, groups, cap, d), torch.randn(rows, groups, cap, d)
    if rope:
        qkv = torch.randn(rows, groups * (group + 2) * d)
        cos, sin = _rope_tables(cap, d)
        kc_ref, vc_ref = kc.clone(), vc.clone()
        q = rope_and_cache_ref(qkv, lengths - 1, cos, sin, kc_ref, vc_ref, heads, groups)
        ref = decode_attention_ref(q, kc_ref, vc_ref, lengths)
        for fused in (True, False):
            k2, v2 = kc.clone(), vc.clone()
            out = _decode_attention_triton(None, k2, v2, lengths, splits, rope=(qkv, cos, sin, heads),
                                           fused=fused, block_n=block_n)
            assert torch.allclose(k2, kc_ref, atol=1e-6) and torch.equal(v2, vc_ref), fused
            assert rel_err(out, ref) < 1e-5, fused
    else:
        q = torch.randn(rows, heads, d)
        ref = decode_attention_ref(q, kc, vc, lengths)
        for fused in (True, False):
            out = _decode_attention_triton(q, kc, vc, lengths, splits, fused=fused, block_n=block_n)
            assert out.shape == q.shape and out.dtype == q.dtype
            assert rel_err(out, ref) < 1e-5, fused


def test_fused_merge_reuses_counters_and_resets_them(monkeypatch):
    """rope_cache_attention (the engine's call) with several chunks is one launch, and three calls in a
    row reuse one arrival-counter buffer that every call leaves at zero: each call's output (new
    queries and keys each time) equals the reference. Without the reset the second call's programs
    count on from the first's and none merges."""
    from bluelm_kernels import decode_attention as da

    def no_combine(*_a, **_k):
        raise AssertionError("the fused path must not launch the combine kernel")

    monkeypatch.setattr(da, "_combine_kernel", type("NoLaunch", (), {"__getitem__": no_combine})())
    rows, groups, group, cap, d, splits = 2, 2, 5, 128, 16, 2
    heads = groups * group
    cos, sin = _rope_tables(cap, d)
    kc, vc = torch.randn(rows + 1, groups, cap, d), torch.randn(rows + 1, groups, cap, d)
    lengths = torch.tensor([70, 128])
    counters = None
    for _ in range(3):
        qkv = torch.randn(rows, groups * (group + 2) * d)
        kc_ref, vc_ref = kc.clone(), vc.clone()
        q = rope_and_cache_ref(qkv, lengths - 1, cos, sin, kc_ref, vc_ref, heads, groups)
        out = da.rope_cache_attention(qkv, lengths, cos, sin, kc, vc, heads, groups, splits)
        assert rel_err(out, decode_attention_ref(q, kc_ref[:rows], vc_ref[:rows], lengths)) < 1e-5
        now = da._COUNTERS[(torch.device("cpu"), rows * groups)]
        assert counters is None or now is counters  # cached, not made per call
        counters = now
        assert counters.dtype == torch.int32 and not counters.any()  # zeros at rest
        lengths = lengths - 1  # another position next call


def test_arrival_counters_not_made_inside_a_capture(monkeypatch):
    """Counters first needed during CUDA-graph capture would be graph-pool memory zeroed only by the
    captured memset: a clear error instead (the engine's eager warm-up call makes them)."""
    from bluelm_kernels import decode_attention as da

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="outside CUDA-graph capture"):
        da._arrival_counters(torch.device("cuda", 0), 12345)
    assert (torch.device("cuda", 0), 12345) not in da._COUNTERS
