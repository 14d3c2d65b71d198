"""The fused backend's transformer layer: megatron-core's ``TransformerLayer`` with the residual adds
handed to the norms.

A pre-norm layer is ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))``. megatron-core runs the first
add as its own pass (the bias-dropout-add, dropout 0, no bias on the fused backend) and, in the
backward, autograd adds the residual stream's gradient to each norm's input gradient in another pass
(x and h each feed a norm and an add). Here the norms take them (``bluelm_kernels.rmsnorm`` /
``layernorm``): ``norm2.add_norm(attn, x)`` writes h and norm2(h) in one pass and its backward adds the
gradient that reached h directly; ``norm1.norm_passthrough(x)`` hands x on as the residual through the
norm, so its backward adds that gradient too. Per layer: one elementwise pass fewer forward, two fewer
backward (on an H200, ~3.9 ms less kernel time in each 2 x 4096 micro-batch of the multimodal model, the
ViT's 27 layers and the decoder's 28, and the step 0.8-0.9% faster: docs/MULTIMODAL.md). Same values:
the sum is rounded once to the activation dtype, as torch's add.

Where anything else happens between those ops (inference, recomputed norms, activation offloading,
cross-attention, hidden dropout in training, FP8) it is megatron-core's forward, unchanged.
"""
from __future__ import annotations

import functools

from megatron.core import tensor_parallel
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor


class ResidualNormLayer(TransformerLayer):
    fusion = True  # False: megatron-core's forward throughout (benchmarks measure what the fusion saves)

    def _fusion_applies(self, args, kwargs) -> bool:
        return (self.fusion and not args
                and hasattr(self.input_layernorm, "norm_passthrough") and hasattr(self.pre_mlp_layernorm, "add_norm")
                and kwargs.get("inference_context") is None and kwargs.get("inference_params") is None
                and kwargs.get("context") is None and kwargs.get("packed_seq_params") is None
                and isinstance(self.cross_attention, IdentityOp)
                and not (self.recompute_input_layernorm or self.recompute_pre_mlp_layernorm)
                and not (self.offload_attn_norm or self.offload_mlp_norm)
                and not (self.training and self.hidden_dropout > 0.0)
                and not (self.config.fp8 or self.config.fp4) and not self.is_moe_layer)

    def forward(self, *args, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)
        if not self._fusion_applies(args, kwargs):
            return super().forward(*args, **kwargs)
        hidden_states = kwargs["hidden_states"]
        normed, residual = self.input_layernorm.norm_passthrough(hidden_states)
        attn, attn_bias = self.self_attention(
            normed, attention_mask=kwargs.get("attention_mask"), rotary_pos_emb=kwargs.get("rotary_pos_emb"),
            rotary_pos_cos=kwargs.get("rotary_pos_cos"), rotary_pos_sin=kwargs.get("rotary_pos_sin"),
            rotary_pos_cos_sin=kwargs.get("rotary_pos_cos_sin"), attention_bias=kwargs.get("attention_bias"),
            sequence_len_offset=kwargs.get("sequence_len_offset"))
        if attn_bias is not None:  # megatron-core's bias-dropout-add: (x + bias) first, then the residual
            attn = attn + attn_bias
        normed, hidden = self.pre_mlp_layernorm.add_norm(attn, residual)
        mlp = functools.partial(self.mlp, padding_mask=kwargs.get("padding_mask"))
        if self.recompute_mlp:
            out, mlp_bias = tensor_parallel.checkpoint(mlp, False, normed)
        else:
            out, mlp_bias = mlp(normed)
        if mlp_bias is not None:
            out = out + mlp_bias
        output = hidden + out
        return make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True), None
