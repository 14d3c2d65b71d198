"""The vision tower's fused backend (our LayerNorm: F.layer_norm on CPU, every bias in its GEMM, non-causal SDPA)
and its recompute option compute the torch backend's ViT: same features and gradients."""
import pytest
import torch
from distributed import run_distributed

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.schema import RunConfig


def _vit(backend, recompute=None):
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.models.decoder import build_transformer_config
    from megatron_bluelm.models.vision import VisionEncoder, vision_transformer_config
    from megatron_bluelm.parallel.setup import setup_parallel

    args = ["--model.preset", "tiny", "--vision.preset", "vit-tiny", "--model.backend", backend]
    if recompute:
        args += ["--vision.recompute", recompute]
    cfg = load_config(None, args)
    cfg.vision.resolve()
    from megatron_bluelm.config.presets import apply_preset

    apply_preset(cfg.model)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        setup_parallel(1, 1, None, 1, 0)
    vcfg = vision_transformer_config(build_transformer_config(cfg, backend), cfg.vision, backend)
    return VisionEncoder(vcfg, cfg.vision, backend), vcfg


def _random_vit(backend, recompute=None):
    """_vit with every parameter drawn from N(0, 0.2), seed 0 (away from the init's near-identity)."""
    torch.manual_seed(0)
    vit, vcfg = _vit(backend, recompute)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.2)
    return vit, vcfg


def _backward(vit, pixels):
    """The features of pixels, after backward of a fixed linear function of them."""
    feats = vit(pixels)
    (feats * torch.linspace(-1, 1, feats.shape[-1])).sum().backward()
    return feats


def _features_and_grads():
    from megatron_bluelm.models.vision import EpilogueColumnParallelLinear, EpilogueRowParallelLinear, FusedLayerNorm

    ref, _ = _random_vit("torch")
    out = {}
    pixels = torch.randn(3, 3, 112, 112)
    for name, (backend, recompute) in {"torch": ("torch", None), "fused": ("fused", None),
                                       "fused_full_recompute": ("fused", "full")}.items():
        vit, vcfg = _vit(backend, recompute) if name != "torch" else (ref, None)
        if vit is not ref:
            vit.load_state_dict(ref.state_dict())
            assert any(isinstance(m, FusedLayerNorm) for m in vit.modules())
            layer = vit.decoder.layers[0]
            assert isinstance(layer.self_attention.linear_qkv, EpilogueColumnParallelLinear)
            for linear in (layer.self_attention.linear_proj, layer.mlp.linear_fc2):
                assert isinstance(linear, EpilogueRowParallelLinear)
            # every bias is added by its GEMM: the MLP and the bias-dropout-adds get no bias to add
            assert layer.mlp.linear_fc1(torch.randn(4, 1, vcfg.hidden_size))[1] is None
            assert layer.mlp.linear_fc2(torch.randn(4, 1, vcfg.ffn_hidden_size))[1] is None
            assert not vcfg.bias_dropout_fusion and not vcfg.bias_activation_fusion
            assert (vcfg.recompute_granularity == "full") == (recompute == "full")
        vit.train()
        vit.zero_grad()
        feats = _backward(vit, pixels)
        out[name] = {"features": feats.detach(),
                     "grads": {n: p.grad.clone() for n, p in vit.named_parameters()}}
    return out


def test_fused_vision_tower_equals_torch_backend():
    got = run_distributed(_features_and_grads, 1)[0]
    ref = got["torch"]
    for name in ("fused", "fused_full_recompute"):
        torch.testing.assert_close(got[name]["features"], ref["features"], rtol=1e-5, atol=1e-5)
        for n, g in ref["grads"].items():
            torch.testing.assert_close(got[name]["grads"][n], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()),
                                       msg=f"{name}: {n}")


def test_vision_recompute_is_checked():
    cfg = RunConfig()
    cfg.vision.preset, cfg.vision.recompute = "vit-tiny", "sometimes"
    with pytest.raises(ConfigError, match="vision.recompute: one of none, selective, full"):
        cfg.vision.resolve()


def _bias_grads_into_main_grad():
    from megatron_bluelm.models.vision import EpilogueColumnParallelLinear, EpilogueRowParallelLinear
    from megatron_bluelm.training.model_setup import use_fused_wgrad_accumulation

    vit, vcfg = _random_vit("fused")
    vit.train()
    pixels = [torch.randn(2, 3, 112, 112) for _ in range(2)]  # two micro-batches: accumulation
    for px in pixels:  # the reference: autograd's .grad, summed over the micro-batches
        _backward(vit, px)
    want = {n: p.grad.float().clone() for n, p in vit.named_parameters()}
    vit.zero_grad(set_to_none=True)
    for p in vit.parameters():  # what megatron-core's DDP gives every parameter
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
        p.grad_added_to_main_grad = False
    linears = [m for m in vit.modules() if isinstance(m, (EpilogueColumnParallelLinear, EpilogueRowParallelLinear))]
    assert use_fused_wgrad_accumulation([vit]) >= len(linears) == 4 * vcfg.num_layers
    for px in pixels:
        _backward(vit, px)
        for p in vit.parameters():  # DDP's backward hook: a real .grad is added, a placeholder is not
            if p.grad is not None and not p.grad_added_to_main_grad:
                p.main_grad.add_(p.grad)
            p.grad = None
    fused_biases = {id(m.bias) for m in linears}
    for n, p in vit.named_parameters():
        torch.testing.assert_close(p.main_grad, want[n], rtol=1e-4, atol=1e-5 * float(want[n].abs().max()), msg=n)
        assert p.grad_added_to_main_grad == (id(p) in fused_biases or n.endswith("linear_qkv.weight")
                                             or n.endswith("linear_proj.weight") or n.endswith("fc1.weight")
                                             or n.endswith("fc2.weight")), n
    return len(fused_biases)


def test_fused_bias_gradients_go_into_main_grad():
    """With the weight-gradient fusion on, the fused ViT linears' bias gradients are fp32 column sums added
    to main_grad by the linear's backward (megatron-core's placeholder to autograd): the same gradients as
    autograd's .grad over two micro-batches."""
    assert run_distributed(_bias_grads_into_main_grad, 1)[0] == 4 * 2  # vit-tiny: 2 layers x 4 linears
