"""bluelm_kernels.qkv_split under the Triton interpreter: megatron-core's QKV split forward, and a
backward (one launch writing dq, dk, dv into d(mixed_qkv)) equal to autograd's through torch.split, for
gradients in megatron's [s, b, heads, d] layout and in the [b, heads, s, d] layout attention kernels
return, with one and several query heads a group."""
import pytest
import torch

import bluelm_kernels.qkv_split as qs


@pytest.mark.parametrize("hpg", [1, 3])
@pytest.mark.parametrize("grad_layout", ["sbhd", "bhsd"])
def test_split_and_its_backward_match_megatron(hpg, grad_layout, monkeypatch):
    monkeypatch.setitem(qs.TUNE, "tokens", 4)  # partial last program
    s, b, g, d = 7, 3, 2, 12  # head dim not a power of two (the ViT's is 72)
    mixed = torch.randn(s, b, g, (hpg + 2) * d, requires_grad=True)
    got = qs.split_qkv(mixed, hpg)
    want = qs.split_qkv_ref(mixed, hpg)
    assert [tuple(t.shape) for t in got] == [(s, b, g * hpg, d), (s, b, g, d), (s, b, g, d)]
    for a, w in zip(got, want):
        assert torch.equal(a, w)
    grads = []
    for t in got:
        gr = torch.randn(t.shape)
        if grad_layout == "bhsd":  # contiguous [b, heads, s, d] seen as [s, b, heads, d]
            gr = gr.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)
        grads.append(gr)
    (dmixed,) = torch.autograd.grad(got, mixed, grads)
    (want_dmixed,) = torch.autograd.grad(want, mixed, grads)
    assert torch.equal(dmixed, want_dmixed)


def test_cat_heads_picks_the_order_of_the_gradient_layout():
    s, b, g, d = 5, 4, 3, 8
    dq, dk, dv = (torch.randn(b, g, s, d).permute(2, 0, 1, 3) for _ in range(3))  # positions adjacent
    out = qs.cat_heads(dq, dk, dv, 1)
    assert out.is_contiguous() and torch.equal(out, torch.cat([dq, dk, dv], dim=-1))


def test_unused_output_gradients_are_zeros():
    mixed = torch.randn(3, 2, 2, 3 * 4, requires_grad=True)
    q, k, v = qs.split_qkv(mixed, 1)
    (q.sum() + v.sum()).backward()
    want = torch.ones_like(mixed).view(3, 2, 2, 3, 4)
    want[:, :, :, 1] = 0
    assert torch.equal(mixed.grad, want.view_as(mixed))


def test_bad_shape_names_the_layout():
    with pytest.raises(ValueError, match=r"heads per group 2 \+ 2"):
        qs.split_qkv(torch.randn(2, 2, 1, 10), 2)


def _vit_fused_vs_torch():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "multimodal"))
    from _kernel_check import graph_node_types
    from test_vision_fused import _backward, _random_vit, _vit

    out = {}
    ref, _ = _random_vit("torch")
    pixels = torch.randn(2, 3, 112, 112)
    for backend in ("torch", "fused"):
        vit = ref if backend == "torch" else _vit("fused")[0]
        vit.load_state_dict(ref.state_dict())
        vit.train()
        feats = _backward(vit, pixels)
        out[backend] = {"features": feats.detach(), "nodes": set(graph_node_types(feats)),
                        "grads": {n: p.grad.clone() for n, p in vit.named_parameters()}}
    return out


def test_fused_vit_attention_takes_the_split_and_keeps_the_gradients():
    """The fused ViT layer's attention (models/vision.py) splits the QKV output with split_qkv: no
    SplitWithSizesBackward (the cat) in its graph, features and every gradient as the torch backend's."""
    from distributed import run_distributed

    got = run_distributed(_vit_fused_vs_torch, 1)[0]
    fused, ref = got["fused"], got["torch"]
    assert "SplitWithSizesBackward0" in ref["nodes"]
    assert "_SplitQKVBackward" in fused["nodes"] and "SplitWithSizesBackward0" not in fused["nodes"]
    torch.testing.assert_close(fused["features"], ref["features"], rtol=1e-5, atol=1e-5)
    for n, g in ref["grads"].items():
        torch.testing.assert_close(fused["grads"][n], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=n)
