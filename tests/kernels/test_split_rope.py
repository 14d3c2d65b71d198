"""The fused backend's QKV split + RoPE (``bluelm_kernels.rope.split_rope_qkv``): the same query, key,
value and gradients as megatron-core's split followed by ``apply_rope_qk``, bit for bit (the same
rotation arithmetic; the gradient slots are written instead of concatenated), and no concatenation
in the attention's backward."""
import pytest
import torch
from _kernel_check import graph_node_types, rel_err
from distributed import run_distributed
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from bluelm_kernels.rope import apply_rope_qk, split_rope_qkv, use_triton


def _megatron_split(mixed, hpg):
    """SelfAttention.get_query_key_value_tensors' split of [s, b, groups, (hpg + 2) * d]."""
    s, b, _, w = mixed.shape
    d = w // (hpg + 2)
    q, k, v = torch.split(mixed, [hpg * d, d, d], dim=3)
    return q.reshape(s, b, -1, d), k, v


def _freqs(s, b, rot, per_token, strided):
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    pos = torch.randint(0, 64, (s, b)).float() if per_token else torch.arange(s).float()[:, None]
    f = pos[..., None] * inv
    f = torch.cat([f, f + 0.3], -1)[:, :, None, :]  # halves differ: the exact per-half formula
    if strided:  # a slice of a wider table: rows and positions not contiguous
        wide = torch.zeros(f.shape[0], f.shape[1], 1, 2 * rot)
        wide[..., 3:3 + rot] = f
        f = wide[..., 3:3 + rot]
        assert not f.is_contiguous()
    return f


def _run(split_rope, s, b, g, hpg, d, freqs, seed=0):
    """Project x [s, b, h] with a QKV weight as linear_qkv does, split + rotate, backward with
    upstream grads in SDPA's layouts (dv as [b, groups, s, d] storage, dq / dk contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    h = 24
    x = torch.randn(s, b, h, generator=gen).requires_grad_()
    w = torch.randn(g * (hpg + 2) * d, h, generator=gen).requires_grad_()
    mixed = (x @ w.t()).view(s, b, g, (hpg + 2) * d)
    mixed.retain_grad()
    q, k, v = split_rope(mixed, freqs, hpg)
    ups = (torch.randn(q.shape, generator=gen), torch.randn(k.shape, generator=gen),
           torch.randn(b, g, s, d, generator=gen).permute(2, 0, 1, 3))
    sum((t * u).sum() for t, u in zip((q, k, v), ups)).backward()
    return {"q": q, "k": k, "v": v, "mixed": mixed.grad, "x": x.grad, "w": w.grad}


def _unfused(mixed, freqs, hpg):
    q, k, v = _megatron_split(mixed, hpg)
    q, k = apply_rope_qk(q, k, freqs)
    return q, k, v


CASES = [  # s, b, groups, heads per group, head dim, rot, per-token freqs, strided freqs
    (5, 2, 2, 3, 16, 16, False, False),   # GQA, heads per group > 1: the grouped query slots
    (6, 2, 4, 1, 16, 12, True, False),    # heads per group = 1 (MHA layout), rot < d
    (4, 3, 1, 5, 16, 16, True, True),     # one group (TP with groups = ranks), strided freqs
    (12, 1, 2, 5, 16, 12, True, False),   # a row-folded micro-batch [b * s, 1, ...]
    (7, 1, 4, 5, 32, 32, False, True),    # bluelm-2.5-3b's 20 heads / 4 groups, b = 1
]


@pytest.mark.parametrize("case", CASES)
def test_split_rope_equals_megatron_split_then_rope(case):
    s, b, g, hpg, d, rot, per_token, strided = case
    f = _freqs(s, b, rot, per_token, strided)
    assert use_triton(f)
    got, want = _run(split_rope_qkv, s, b, g, hpg, d, f), _run(_unfused, s, b, g, hpg, d, f)
    for name, w in want.items():
        assert got[name].shape == w.shape and got[name].stride() == w.stride(), name
        assert torch.equal(got[name], w), f"{name}: rel err {rel_err(got[name], w)}"
    assert got["v"]._base is not None  # the value stays a view of the projection's output
    # and megatron-core's own rotary on the split (independent of our kernel)
    mixed = (torch.randn(s, b, 24) @ torch.randn(g * (hpg + 2) * d, 24).t()).view(s, b, g, -1)
    q, k, _ = _megatron_split(mixed, hpg)
    got_q, got_k, _ = split_rope_qkv(mixed, f, hpg)
    assert rel_err(got_q, _apply_rotary_pos_emb_bshd(q, f.contiguous())) < 1e-6
    assert rel_err(got_k, _apply_rotary_pos_emb_bshd(k, f.contiguous())) < 1e-6


def test_small_tiles_and_head_steps(monkeypatch):
    # several token tiles and head steps of 2 over 10 grouped query heads (5 per group)
    from bluelm_kernels.rope import TUNE

    for pre in ("", "bwd_"):
        monkeypatch.setitem(TUNE, pre + "tokens", 2)
        monkeypatch.setitem(TUNE, pre + "heads", 2)
    s, b, g, hpg, d = 7, 3, 2, 4, 16
    f = _freqs(s, b, 12, True, False)
    got, want = _run(split_rope_qkv, s, b, g, hpg, d, f), _run(_unfused, s, b, g, hpg, d, f)
    for name, w in want.items():
        assert torch.equal(got[name], w), name


def test_bad_shapes_are_named():
    mixed = torch.randn(4, 2, 2, 5 * 16)
    with pytest.raises(ValueError, match=r"mixed_qkv \(4, 2, 2, 80\) is not .*heads per group 4"):
        split_rope_qkv(mixed, _freqs(4, 2, 16, False, False), 4)
    with pytest.raises(ValueError, match=r"freqs \(3, 1, 1, 16\)"):
        split_rope_qkv(mixed, _freqs(3, 1, 16, False, False), 3)


# ---------------------------------------------------------------------------- the attention layer

def _attention_fused_vs_unfused():
    """BlueLMSelfAttention of the fused backend's spec, its split + RoPE op on and off (off: today's
    megatron split + apply_rope_qk), on the same weights and inputs."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_bluelm.models.spec import decoder_layer_spec
    from megatron_bluelm.parallel.setup import setup_parallel

    setup_parallel(1, 1, None, 1, 0)
    out = {}
    spec = decoder_layer_spec("fused").submodules.self_attention
    for name, (s, b, recompute) in {"b2": (6, 2, False), "folded_recompute_core": (12, 1, True)}.items():
        kw = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]} if recompute else {}
        config = TransformerConfig(num_layers=1, hidden_size=48, num_attention_heads=6, num_query_groups=2,
                                   kv_channels=16, add_bias_linear=False, attention_dropout=0.0,
                                   hidden_dropout=0.0, **kw)
        torch.manual_seed(0)
        attn = build_module(spec, config=config, layer_number=1)
        with torch.no_grad():
            for p in attn.parameters():
                p.normal_(0, 0.3)
        attn.train()
        assert attn.checkpoint_core_attention == recompute
        freqs = RotaryEmbedding(16, rotary_percent=0.75)(s)  # rot 12 < head dim 16
        x0 = torch.randn(s, b, 48)
        runs = {}
        for variant in ("fused", "unfused"):
            attn.split_rope_fn = spec.params["split_rope_fn"] if variant == "fused" else None
            attn.zero_grad()
            x = x0.clone().requires_grad_()
            y, _ = attn(x, None, rotary_pos_emb=freqs)
            nodes = graph_node_types(y)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
            runs[variant] = {
                "y": y.detach(), "x_grad": x.grad,
                "grads": {n: p.grad.clone() for n, p in attn.named_parameters()},
                "nodes": sorted(set(nodes)),
                "cats": sum(e.count for e in prof.key_averages() if e.key == "aten::cat"),
            }
        out[name] = runs
    # groups split over TP ranks: megatron's split gathers and re-slices there; the op must not apply
    attn.world_size = 4
    out["applies_with_groups_split"] = attn._fused_split_applies(attn.split_rope_fn)
    return out


def test_attention_backward_runs_no_concatenation():
    got = run_distributed(_attention_fused_vs_unfused, 1)[0]
    assert got.pop("applies_with_groups_split") is False
    for name, runs in got.items():
        fused, unfused = runs["fused"], runs["unfused"]
        # today's path: the split's backward concatenates dq, dk, dv; the fused op: no cat at all
        assert "SplitWithSizesBackward0" in unfused["nodes"] and unfused["cats"] > 0, name
        assert "SplitWithSizesBackward0" not in fused["nodes"] and fused["cats"] == 0, (name, fused)
        assert "_SplitRopeQKVBackward" in fused["nodes"], name
        assert torch.equal(fused["y"], unfused["y"]), name
        assert torch.equal(fused["x_grad"], unfused["x_grad"]), name
        assert fused["grads"].keys() == unfused["grads"].keys() and fused["grads"], name
        for n, g in unfused["grads"].items():
            assert torch.equal(fused["grads"][n], g), (name, n)
