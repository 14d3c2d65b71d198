"""bluelm_kernels/sdpa_choice.py: the SDPA backend measured fastest per shape (the ViT's attention)."""
import pytest
import torch
import torch.nn.functional as F

from bluelm_kernels import sdpa_choice


def _qkv(b=2, n=4, s=24, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, s, d, generator=g, requires_grad=True) for _ in range(3)]


def test_measure_picks_the_fastest_and_skips_backends_that_reject_the_call():
    q, k, v = _qkv()
    names = list(sdpa_choice.BACKENDS)  # timed in this order
    times = iter([3.0, 1.0, 2.0])
    assert sdpa_choice.measure(q, k, v, causal=False, scale=None, gqa=False, grad=True,
                               timer=lambda fn: next(times)) == names[1]

    def reject_first(fn, calls=[]):  # noqa: B006 (the call count across calls)
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("No available kernel")
        return 5.0 - len(calls)

    assert sdpa_choice.measure(q, k, v, causal=False, scale=None, gqa=False, grad=True,
                               timer=reject_first) == names[2]

    def reject_all(fn):
        raise RuntimeError("No available kernel")

    assert sdpa_choice.measure(q, k, v, causal=False, scale=None, gqa=False, grad=True, timer=reject_all) is None


def test_measure_runs_forward_and_backward_on_copies():
    q, k, v = _qkv(seed=1)
    ran = []

    def timer(fn):
        fn()  # a backend that cannot take the call raises here (on CPU: cuDNN, memory-efficient)
        ran.append(1)
        return float(len(ran))

    got = sdpa_choice.measure(q, k, v, causal=True, scale=None, gqa=False, grad=True, timer=timer)
    assert ran and got in sdpa_choice.BACKENDS  # the first backend that ran (times grow)
    assert all(t.grad is None for t in (q, k, v))  # the caller's tensors are never touched


def test_measure_copies_keep_the_layout_and_grow_the_batch():
    sbnd = torch.randn(24, 3, 4, 16).permute(1, 2, 0, 3)  # the ViT's [s, b, n, d] views, b = 3
    grown = sdpa_choice._measure_copy(sbnd, 16, True)
    assert grown.shape == (16, 4, 24, 16) and grown.requires_grad and grown.is_leaf
    assert sdpa_choice._layout(grown) == sdpa_choice._layout(sbnd)
    assert torch.equal(grown[:3], sbnd) and torch.equal(grown[3:6], sbnd) and torch.equal(grown[15], sbnd[0])
    q, k, v = _qkv(b=2)
    shapes = []  # the batch of every timed call
    original = F.scaled_dot_product_attention
    try:
        F.scaled_dot_product_attention = lambda q, *a, **kw: shapes.append(q.shape[0]) or original(q, *a, **kw)
        sdpa_choice.measure(q, k, v, causal=False, scale=None, gqa=False, grad=False, timer=lambda fn: fn() or 1.0)
    finally:
        F.scaled_dot_product_attention = original
    assert shapes and set(shapes) == {sdpa_choice.MIN_MEASURE_BATCH}


def test_key_ignores_the_batch_but_not_shape_layout_or_flags():
    q, k, _ = _qkv(b=2)
    q4, k4, _ = _qkv(b=4)
    key = sdpa_choice._key(q, k, False, False, True)
    assert sdpa_choice._key(q4, k4, False, False, True) == key
    assert sdpa_choice._key(q, k, True, False, True) != key
    assert sdpa_choice._key(q, k, False, False, False) != key
    sbnd = torch.randn(24, 2, 4, 16).permute(1, 2, 0, 3)  # the ViT's [s, b, n, d] views
    assert sbnd.shape == q.shape and sdpa_choice._key(sbnd, k, False, False, True) != key
    assert sdpa_choice._key(q[:, :, :12], k, False, False, True) != key


@pytest.mark.parametrize("choose", ["measure", "default", "cudnn", "flash", "efficient"])
def test_cpu_runs_pytorchs_choice_whatever_is_asked(choose):
    q, k, v = _qkv(seed=2)
    torch.testing.assert_close(sdpa_choice.sdpa(q, k, v, choose=choose), F.scaled_dot_product_attention(q, k, v))
    assert not sdpa_choice.CHOICES  # nothing is measured off CUDA


def test_unknown_choice_is_an_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="SDPA backend 'fastest': one of measure, default, cudnn"):
        sdpa_choice.sdpa(q, k, v, choose="fastest")


def test_vit_layers_take_the_configured_backend():
    from megatron_bluelm.models.vision import vision_layer_spec

    spec = vision_layer_spec("torch", "flash")
    core = spec.submodules.self_attention.submodules.core_attention
    assert core.params == {"sdpa_choice": "flash"}
    assert vision_layer_spec("fused", "measure").submodules.self_attention.submodules.core_attention.params == {
        "sdpa_choice": "measure"}
