"""models/layer.py ResidualNormLayer under the Triton interpreter: the fused backend's decoder and ViT
layers with the residual adds in the norms' kernels compute megatron-core's layer (same output and
gradients, one residual add instead of two in the graph); where megatron-core's forward does more
(hidden dropout in training) the layer is megatron-core's."""
import torch
from _kernel_check import graph_node_types
from distributed import run_distributed


def _layers_fused_vs_megatron():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_bluelm.models.layer import ResidualNormLayer
    from megatron_bluelm.models.spec import decoder_layer_spec
    from megatron_bluelm.models.vision import gelu_tanh, vision_layer_spec
    from megatron_bluelm.parallel.setup import setup_parallel

    setup_parallel(1, 1, None, 1, 0)
    common = dict(num_layers=1, hidden_size=48, attention_dropout=0.0, hidden_dropout=0.0, kv_channels=16)
    cases = {
        "decoder": (decoder_layer_spec("fused"), TransformerConfig(
            num_attention_heads=6, num_query_groups=2, add_bias_linear=False, normalization="RMSNorm",
            gated_linear_unit=True, ffn_hidden_size=64, **common), True),
        "vit": (vision_layer_spec("fused"), TransformerConfig(
            num_attention_heads=3, add_bias_linear=True, normalization="LayerNorm", activation_func=gelu_tanh,
            bias_activation_fusion=False, bias_dropout_fusion=False, ffn_hidden_size=64, **common), False),
    }
    out = {}
    for name, (spec, config, rope) in cases.items():
        torch.manual_seed(0)
        layer = build_module(spec, config=config, layer_number=1)
        assert isinstance(layer, ResidualNormLayer)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.3)
        layer.train()
        freqs = RotaryEmbedding(16, rotary_percent=1.0)(5) if rope else None
        x0 = torch.randn(5, 2, 48)
        runs = {}
        for fusion in (True, False):
            ResidualNormLayer.fusion = fusion
            layer.zero_grad()
            x = x0.clone().requires_grad_()
            y, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=freqs)
            nodes = graph_node_types(y)
            (y * torch.linspace(-1, 1, 48)).sum().backward()
            runs[fusion] = {"y": y.detach(), "x_grad": x.grad, "adds": nodes.count("AddBackward0"),
                            "grads": {n: p.grad.clone() for n, p in layer.named_parameters()}}
        ResidualNormLayer.fusion = True
        layer.hidden_dropout = 0.1  # megatron-core's bias-dropout-add then: its forward, two adds
        y, _ = layer(hidden_states=x0.clone().requires_grad_(), attention_mask=None, rotary_pos_emb=freqs)
        runs["dropout_adds"] = graph_node_types(y).count("AddBackward0")
        out[name] = runs
    return out


def test_residual_norm_layer_computes_megatrons_layer():
    got = run_distributed(_layers_fused_vs_megatron, 1)[0]
    for name, runs in got.items():
        fused, ref = runs[True], runs[False]
        # the attention's residual add goes into the pre-MLP norm; with dropout: megatron-core's adds
        assert fused["adds"] == ref["adds"] - 1 == runs["dropout_adds"] - 1, name
        torch.testing.assert_close(fused["y"], ref["y"], rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(fused["x_grad"], ref["x_grad"], rtol=1e-5, atol=1e-6, msg=name)
        assert fused["grads"].keys() == ref["grads"].keys() and fused["grads"], name
        for n, g in ref["grads"].items():
            torch.testing.assert_close(fused["grads"][n], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()),
                                       msg=f"{name}: {n}")
