"""The vision encoder: a SigLIP-shaped ViT on megatron-core transformer layers (tensor parallel).

SigLIP's structure: a stride-``patch`` convolution turns each image tile into a grid of patch
embeddings, plus learned absolute position embeddings; pre-norm transformer layers with LayerNorm,
biases on every linear, bidirectional attention, a GELU(tanh) MLP (not gated); a final LayerNorm.
No class token, no pooling head: every patch token goes to the adapter (models/adapter.py).

TP: attention heads and the MLP are split like the decoder's (column / row parallel linears); the
patch convolution, position embeddings and norms are replicated, and receive identical gradients on
every TP rank because their inputs (the pixels) and the gradients flowing into them are replicated.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import LinearWithGradAccumulationAndAsyncCommunication, custom_fwd
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_bluelm.config.vision import VisionConfig
from megatron_bluelm.models.attention import SDPACoreAttention
from megatron_bluelm.models.layer import ResidualNormLayer
from megatron_bluelm.models.spec import prenorm_layer_spec


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """SigLIP's MLP activation (``gelu_pytorch_tanh`` in transformers). Module-level: picklable."""
    return F.gelu(x, approximate="tanh")


class LayerNorm(torch.nn.Module):
    """LayerNorm with weight and bias, megatron's norm signature ``(config, hidden_size, eps)``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in (self.weight, self.bias):
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class NativeLayerNorm(LayerNorm):
    """The fused backend's LayerNorm: one ``F.layer_norm`` kernel in the activations' dtype (on CUDA it
    accumulates in fp32 internally), without the fp32 copies of the input and output the reference
    above makes: two fewer full passes over [patches x tiles, hidden] in each direction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class FusedLayerNorm(NativeLayerNorm):
    """The fused backend's LayerNorm: ``bluelm_kernels.layernorm`` (Triton) where Triton runs, i.e. on
    CUDA: one pass over x each way, fp32 statistics, and the weight / bias gradients summed inside the
    backward's launch (PyTorch's LayerNorm backward spends longer on them than on dx). Elsewhere (CPU,
    no Triton) the native ``F.layer_norm`` above. Same parameters (names, dtype) as the others."""

    kernel = True  # False: always the native path (benchmarks measure what the kernel saves)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bluelm_kernels.dispatch import use_triton
        from bluelm_kernels.layernorm import layernorm

        if self.kernel and use_triton(x):
            return layernorm(x, self.weight, self.bias, self.eps)
        return super().forward(x)

    def add_norm(self, x, residual):
        """(norm(x + residual), x + residual); on the kernel, the add in the norm's forward pass and the
        sum's gradient added inside its backward (models/layer.py: the pre-MLP norm)."""
        from bluelm_kernels.dispatch import use_triton
        from bluelm_kernels.layernorm import layernorm

        if self.kernel and use_triton(x):
            return layernorm(x, self.weight, self.bias, self.eps, residual=residual)
        s = x + residual
        return self.forward(s), s

    def norm_passthrough(self, x):
        """(norm(x), x); on the kernel, the gradient reaching the second output (the residual stream)
        joins x's inside the norm's backward launch (models/layer.py: the input norm)."""
        from bluelm_kernels.dispatch import use_triton
        from bluelm_kernels.layernorm import layernorm_passthrough

        if self.kernel and use_triton(x):
            return layernorm_passthrough(x, self.weight, self.bias, self.eps)
        return self.forward(x), x


class _BiasEpilogueLinear(LinearWithGradAccumulationAndAsyncCommunication):
    """megatron-core's linear function (same arguments, same backward: input gradient, weight gradient
    or its accumulation into ``main_grad``, bias gradient, TP all-reduce) with the bias added by the
    GEMM itself (``torch.addmm``: cuBLASLt's bias epilogue), not by a broadcast add over the output
    afterwards: one pass less over [patches x tiles, 3 x hidden] per layer. Without sequence
    parallelism only (the ViT never uses it), where the forward has no all-gather."""

    bias_kernel = True  # False: megatron-core's bias gradient (benchmarks measure what the kernel saves)

    @staticmethod
    @custom_fwd
    def forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                grad_output_buffer, wgrad_deferral_limit, tp_group):
        assert not sequence_parallel and bias is not None
        ctx.save_for_backward(input, weight)
        # the fields megatron-core's backward reads
        ctx.main_grad = weight.main_grad if gradient_accumulation_fusion and hasattr(weight, "main_grad") else None
        ctx.use_bias = True
        ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.sequence_parallel = False
        ctx.wgrad_deferral_limit = wgrad_deferral_limit
        ctx.grad_output_buffer = grad_output_buffer
        ctx.tp_group = tp_group
        # the bias gradient: into the bias's fp32 main_grad where the weight's goes into its own
        # (megatron-core's placeholder protocol, as models/embedding.py), else returned
        ctx.bias = bias
        ctx.bias_into_main_grad = (gradient_accumulation_fusion and hasattr(bias, "main_grad")
                                   and hasattr(bias, "grad_added_to_main_grad"))
        out = torch.addmm(bias, input.reshape(-1, input.shape[-1]), weight.t())
        return out.view(*input.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        """megatron-core's backward for the input and weight gradients; the bias gradient by
        ``bluelm_kernels.bias_grad`` (fp32 column sums; on an H200 0.144 ms a layer for the four biases
        against 0.201 for ``sum(0)`` and DDP's add), added straight to ``main_grad`` with the fusion on."""
        from bluelm_kernels.bias_grad import column_sum, column_sum_into_

        bias, ctx.bias = ctx.bias, None
        if not _BiasEpilogueLinear.bias_kernel:
            return LinearWithGradAccumulationAndAsyncCommunication.backward(ctx, grad_output)
        into = _bias_main_grad(ctx, bias)
        if into is not None:
            column_sum_into_(into, grad_output)
        grad_bias = column_sum(grad_output, bias.dtype) if into is None and ctx.needs_input_grad[2] else None
        return _linear_backward(ctx, grad_output, bias, into, grad_bias)


def _bias_main_grad(ctx, bias):
    """The bias's fp32 main_grad where its gradient goes there (the fusion on, the bias trained), else None."""
    return bias.main_grad if ctx.bias_into_main_grad and ctx.needs_input_grad[2] else None


def _linear_backward(ctx, grad_output, bias, into, grad_bias):
    """megatron-core's input and weight gradients for ``grad_output``, with the bias gradient computed
    by the caller: already in ``into`` (main_grad; megatron-core's placeholder to autograd) or ``grad_bias``."""
    from megatron_bluelm.models.embedding import placeholder_grad

    ctx.use_bias = False  # megatron-core's backward then skips its dy.sum(0)
    grads = list(LinearWithGradAccumulationAndAsyncCommunication.backward(ctx, grad_output))
    if into is not None:
        bias.grad_added_to_main_grad = True
        grads[2] = placeholder_grad(bias)
    else:
        grads[2] = grad_bias if ctx.needs_input_grad[2] else None
    return tuple(grads)


class _BiasGeluLinear(_BiasEpilogueLinear):
    """``gelu_tanh(x @ W.T + b)`` (the ViT's fc1 and its activation) as one autograd function: the
    forward is the bias-epilogue GEMM and torch's GELU; the backward's first pass is
    ``bluelm_kernels.bias_grad.gelu_tanh_backward_bias``, the GELU gradient and the bias gradient (its
    column sums, into ``main_grad`` with the fusion on) together, then megatron-core's input and weight
    gradients of the linear, as ``_BiasEpilogueLinear``'s."""

    @staticmethod
    @custom_fwd
    def forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                grad_output_buffer, wgrad_deferral_limit, tp_group):
        h = _BiasEpilogueLinear.forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                                        sequence_parallel, grad_output_buffer, wgrad_deferral_limit, tp_group)
        ctx.pre_activation = h  # megatron-core's backward unpacks exactly (input, weight) from saved_tensors
        return F.gelu(h, approximate="tanh")

    @staticmethod
    def backward(ctx, grad_output):
        from bluelm_kernels.bias_grad import gelu_tanh_backward_bias

        h, bias = ctx.pre_activation, ctx.bias
        ctx.pre_activation = ctx.bias = None
        into = _bias_main_grad(ctx, bias)
        grad_h, grad_bias = gelu_tanh_backward_bias(grad_output, h, bias.dtype, into)
        del h
        return _linear_backward(ctx, grad_h, bias, into, grad_bias)


class EpilogueColumnParallelLinear(ColumnParallelLinear):
    """The fused backend's column-parallel linear of the ViT: the bias in the GEMM's epilogue
    (``_BiasEpilogueLinear``) where megatron-core would add it in a separate pass (a trained weight, no
    sequence parallelism); everything else, and every other case (frozen weights), is megatron-core's.
    With ``skip_bias_add`` (megatron-core's MLP builds fc1 so, to add the bias inside its fused
    bias-GELU) the bias is added by the GEMM all the same and the returned bias is None: the MLP then
    applies the plain activation, one elementwise pass each way with no compiled function to call."""

    epilogue = True  # False: megatron-core's path throughout (benchmarks measure what it saves)
    gelu_fusion = True  # False: forward_gelu is this linear, then torch's GELU (benchmarks)

    def _epilogue_applies(self, weight) -> bool:
        return self.epilogue and self.bias is not None and weight.requires_grad and not self.sequence_parallel

    def forward_gelu(self, input_):
        """``gelu_tanh(linear(input_))`` (fc1 and the ViT MLP's activation, ``VisionMLP``): where the
        epilogue applies, ``_BiasGeluLinear`` (the GELU and bias gradients in one backward pass)."""
        if not (self.gelu_fusion and self.skip_bias_add and not self.gather_output
                and self._epilogue_applies(self.weight)):
            out, bias = self.forward(input_)
            return gelu_tanh(out if bias is None else out + bias)
        self._gelu = True
        try:
            out, _ = self.forward(input_)
        finally:
            self._gelu = False
        return out

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not (self.skip_bias_add and self._epilogue_applies(self.weight if weight is None else weight)):
            return super().forward(input_, weight, runtime_gather_output)
        self.skip_bias_add = False  # megatron-core then hands the bias to _forward_impl, i.e. to the GEMM
        try:
            output, _ = super().forward(input_, weight, runtime_gather_output)
        finally:
            self.skip_bias_add = True
        return output, None

    def _forward_impl(self, input, weight, *args, **kwargs):
        bias = kwargs.get("bias")
        if args or bias is None or kwargs.get("sequence_parallel") or not self._epilogue_applies(weight):
            return super()._forward_impl(input, weight, *args, **kwargs)
        fn = _BiasGeluLinear if getattr(self, "_gelu", False) else _BiasEpilogueLinear
        return fn.apply(
            input, weight, bias, kwargs["gradient_accumulation_fusion"], kwargs["allreduce_dgrad"], False,
            kwargs.get("grad_output_buffer"), kwargs.get("wgrad_deferral_limit"), kwargs.get("tp_group", self.tp_group))


class VisionMLP(MLP):
    """The fused backend's ViT MLP: fc1 and GELU(tanh) as ``EpilogueColumnParallelLinear.forward_gelu``,
    then fc2; megatron-core's MLP wherever anything else is asked of it (a per-token scale, another
    activation, other linears)."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        fc1 = self.linear_fc1
        if (per_token_scale is not None or self.activation_func is not gelu_tanh or self.config.gated_linear_unit
                or self.config.use_te_activation_func or not isinstance(fc1, EpilogueColumnParallelLinear)):
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        return self.linear_fc2(fc1.forward_gelu(hidden_states))


class EpilogueRowParallelLinear(RowParallelLinear):
    """The fused backend's row-parallel linear of the ViT (attention projection, fc2): without tensor
    parallelism the bias is added by the GEMM (``_BiasEpilogueLinear``) and the returned bias is None,
    so the layer's bias-dropout-add is a plain residual add (one pass, nothing compiled to call) and
    the bias gradient is megatron-core's column sum in the linear's backward. With TP the bias must be
    added once after the all-reduce of the partial products: megatron-core's path (as for frozen
    weights)."""

    epilogue = True  # False: megatron-core's path throughout (benchmarks measure what it saves)

    def forward(self, input_):
        if (not self.epilogue or self.bias is None or not self.weight.requires_grad or self.sequence_parallel
                or self.explicit_expert_comm or not self.input_is_parallel
                or self.config._cpu_offloading_context is not None
                or (self.tp_group is not None and self.tp_group.size() > 1)):
            return super().forward(input_)
        output = _BiasEpilogueLinear.apply(input_, self.weight, self.bias, self.gradient_accumulation_fusion, False,
                                           False, None, 0, None)
        return output, None


def _vision_recompute(lm_config: TransformerConfig, v: VisionConfig) -> dict:
    """``vision.recompute``: none | selective (the attention core) | full (every layer); unset: the
    decoder's ``training.recompute``."""
    if v.recompute is None:
        return {}
    if v.recompute == "none":
        return dict(recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
                    recompute_modules=None)
    if v.recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"], recompute_method=None,
                    recompute_num_layers=None)
    return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def vision_transformer_config(lm_config: TransformerConfig, v: VisionConfig,
                              backend: str = "torch") -> TransformerConfig:
    """The decoder's config (precision, TP) with the ViT's shape; no pipeline split: the whole ViT
    lives on the first pipeline stage. The fused backend adds every bias inside its GEMM
    (``EpilogueColumnParallelLinear`` / ``EpilogueRowParallelLinear``), so GELU(tanh) and the residual
    adds are plain one-pass elementwise ops: none of megatron-core's compiled bias-GELU /
    bias-dropout-add, whose every call goes through torch.compile's guards and runtime wrappers on the
    host (~0.3 ms a call under cProfile, six calls per layer forward and backward, in a ViT whose
    forward the host issued more slowly than the device ran it). With TP the row-parallel biases are
    added after the all-reduce, by megatron-core's fused bias-dropout-add (dropout 0: ``x + bias +
    residual`` in one pass)."""
    fused = backend == "fused"
    bda_fused = fused and lm_config.tensor_model_parallel_size > 1
    return dataclasses.replace(
        lm_config,
        num_layers=v.num_layers, hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.num_attention_heads, num_query_groups=v.num_attention_heads,
        kv_channels=v.hidden_size // v.num_attention_heads, layernorm_epsilon=v.norm_eps,
        normalization="LayerNorm", add_bias_linear=True, gated_linear_unit=False,
        activation_func=gelu_tanh, bias_activation_fusion=False, bias_dropout_fusion=bda_fused,
        use_te_activation_func=False, sequence_parallel=False,
        pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None,
        overlap_p2p_comm=False, **_vision_recompute(lm_config, v),
    )


@functools.lru_cache(maxsize=None)
def vision_layer_spec(backend: str, attention_backend: str = "default") -> ModuleSpec:
    """One ViT layer: Transformer Engine parts under ``te``; under ``fused`` our Triton LayerNorm and
    every bias in its GEMM (``EpilogueColumnParallelLinear`` / ``EpilogueRowParallelLinear``; see
    ``vision_transformer_config``) and the QKV split of ``bluelm_kernels.qkv_split``; plain torch
    otherwise. Attention is non-causal SDPA on every non-TE backend, on the SDPA backend
    ``attention_backend`` names (``vision.attention_backend``: bluelm_kernels/sdpa_choice.py)."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )

        norm, column, row, core = TENorm, TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    else:
        norm = FusedLayerNorm if backend == "fused" else LayerNorm
        column = EpilogueColumnParallelLinear if backend == "fused" else ColumnParallelLinear
        row = EpilogueRowParallelLinear if backend == "fused" else RowParallelLinear
        core = ModuleSpec(module=SDPACoreAttention, params={"sdpa_choice": attention_backend})
    params = {"attn_mask_type": AttnMaskType.no_mask}  # bidirectional over the patches
    layer, mlp = TransformerLayer, MLP
    if backend == "fused":
        params["split_fn"] = _fused_split_qkv
        layer, mlp = ResidualNormLayer, VisionMLP
    return prenorm_layer_spec(norm, column, row, core, params, layer=layer, mlp=mlp)


def _fused_split_qkv(mixed_qkv, heads_per_group):
    # megatron's QKV split whose backward writes dq, dk, dv into one d(mixed_qkv) (no cat)
    from bluelm_kernels.qkv_split import split_qkv

    return split_qkv(mixed_qkv, heads_per_group)


class VisionEncoder(MegatronModule):
    """pixel_values [tiles, 3, S, S] -> patch features [tiles, (S / patch)^2, hidden]."""

    def __init__(self, config: TransformerConfig, v: VisionConfig, backend: str):
        super().__init__(config=config)
        self.grid = v.image_size // v.patch_size
        self.patch_embedding = torch.nn.Conv2d(3, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size,
                                               dtype=config.params_dtype)
        self.position_embedding = torch.nn.Embedding(self.grid**2, v.hidden_size, dtype=config.params_dtype)
        spec = TransformerBlockSubmodules(layer_specs=[vision_layer_spec(backend, v.attention_backend)] * v.num_layers)
        self.decoder = TransformerBlock(config=config, spec=spec, pre_process=True, post_process=False)
        self.post_layernorm = (FusedLayerNorm if backend == "fused" else LayerNorm)(config, v.hidden_size, v.norm_eps)
        for name, param in self.named_parameters():
            if name.endswith("mlp.linear_fc1.weight"):
                param.glu = False  # one GELU matrix, not a [gate; up] pair (models/init.py)

    def set_input_tensor(self, input_tensor) -> None:  # never pipelined: the first stage holds all of it
        pass

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, g*g, hidden], row-major patches: the stride-``patch`` convolution as one
        matmul over the flattened patches (the same weights and result; a patchify convolution with 3
        input channels is a poor case for convolution kernels, a [n*g*g, 3*p*p] x [3*p*p, hidden] GEMM
        is not)."""
        conv = self.patch_embedding
        p = conv.kernel_size[0]
        n, c, height, width = pixel_values.shape
        if height != self.grid * p or width != self.grid * p:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: tiles must be {self.grid * p} x "
                             f"{self.grid * p} (vision.image_size)")
        x = pixel_values.to(conv.weight.dtype).view(n, c, self.grid, p, self.grid, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(n, self.grid**2, c * p * p)  # (channel, row, column) per patch
        return F.linear(x, conv.weight.flatten(1), conv.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embed_patches(pixel_values) + self.position_embedding.weight  # [n, g*g, h]
        x = self.decoder(x.transpose(0, 1).contiguous(), attention_mask=None)  # [g*g, n, h]
        return self.post_layernorm(x).transpose(0, 1)
