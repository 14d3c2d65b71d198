"""Self-attention for the BlueLM decoder: megatron-core's SelfAttention with a lean training path.

megatron-core's local ``DotProductAttention`` materializes the [b, heads, s, s] score matrix and
repeats K/V for GQA; that is why its no-Transformer-Engine spec runs at ~22% MFU. Here the core is
``scaled_dot_product_attention`` (flash / cuDNN / memory-efficient backends on GPU), GQA without
repeating K/V, and the rotary embedding is a swappable function (torch or our fused kernel).

The training forward below is the part of ``SelfAttention.forward`` we use: QKV projection, RoPE,
core attention, output projection. The fused backend also passes ``split_rope_fn``, which takes the
QKV split and RoPE together: its backward writes dq, dk and dv into one d(mixed_qkv) instead of
the split's backward concatenating them (a full extra read + write of that gradient per layer).
Inference (KV cache) and THD-packed inputs go through megatron-core's own forward unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


def torch_rope(query: torch.Tensor, key: torch.Tensor, freqs: torch.Tensor, config):
    """megatron-core's unfused rotary embedding of query and key ([s, b, heads, d], freqs
    [s, 1|b, 1, d]); returns the rotated (query, key)."""
    return (apply_rotary_pos_emb(query, freqs, config=config),
            apply_rotary_pos_emb(key, freqs, config=config))


class BlueLMSelfAttention(SelfAttention):
    """SelfAttention whose training path applies ``rope_fn(query, key, freqs, config) ->
    (query, key)`` and calls the core directly. With ``split_rope_fn(mixed_qkv, freqs,
    heads_per_group) -> (query, key, value)`` (mixed_qkv: the QKV projection's output viewed as
    megatron's [s, b, groups, (heads/groups + 2) * d]) the split and RoPE are one op wherever
    megatron's split is a plain slicing of that output (see ``_fused_split_applies``); without RoPE (the
    ViT), ``split_fn(mixed_qkv, heads_per_group) -> (query, key, value)`` replaces megatron's split there
    (``bluelm_kernels.qkv_split``: its backward writes the three gradients into one buffer)."""

    def __init__(self, *args, rope_fn: Optional[Callable] = None, split_rope_fn: Optional[Callable] = None,
                 split_fn: Optional[Callable] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rope_fn = rope_fn or torch_rope
        self.split_rope_fn = split_rope_fn
        self.split_fn = split_fn

    def _fused_split_applies(self, fn) -> bool:
        # Where megatron's split does more than slice: query groups split over TP ranks (it gathers
        # the projection and picks this rank's heads), q/k norms and test hooks between split and RoPE.
        return (fn is not None
                and self.config.num_query_groups >= self.world_size
                and all(n is None or isinstance(n, IdentityOp) for n in (self.q_layernorm, self.k_layernorm))
                and not self.config.test_mode)

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, packed_seq_params=None,
                sequence_len_offset=None, **kwargs):
        if inference_context is not None or packed_seq_params is not None or attention_bias is not None:
            return super().forward(
                hidden_states, attention_mask, key_value_states=key_value_states,
                inference_context=inference_context, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset, **kwargs,
            )
        freqs = None
        if rotary_pos_emb is not None:
            freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
        heads_per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if freqs is not None and self._fused_split_applies(self.split_rope_fn):
            mixed_qkv, _ = self.get_query_key_value_tensors(hidden_states, None, split_qkv=False)
            query, key, value = self.split_rope_fn(mixed_qkv, freqs, heads_per_group)
        elif freqs is None and self._fused_split_applies(self.split_fn):
            mixed_qkv, _ = self.get_query_key_value_tensors(hidden_states, None, split_qkv=False)
            query, key, value = self.split_fn(mixed_qkv, heads_per_group)
        else:
            query, key, value = self.get_query_key_value_tensors(hidden_states, None)  # [s, b, n, d]
            if freqs is not None:
                query, key = self.rope_fn(query, key, freqs, self.config)
        if self.checkpoint_core_attention and self.training:
            core = self._checkpointed_attention_forward(query, key, value, attention_mask)
        else:
            core = self.core_attention(query, key, value, attention_mask, attn_mask_type=self.attn_mask_type)
        return self.linear_proj(core)


class SDPACoreAttention(MegatronModule):
    """Causal (optionally document-masked) attention through ``F.scaled_dot_product_attention``.

    Same constructor and call signature as megatron-core's ``DotProductAttention``:
    query [sq, b, heads/tp, d], key/value [sk, b, groups/tp, d] -> [sq, b, heads/tp * d].
    ``attention_mask`` is one of
      * None: plain causal attention (the fast path: no mask tensor at all); with
        ``attn_mask_type=no_mask``, full bidirectional attention (the vision encoder, models/vision.py);
      * integer document ids [b, s] (packed rows, :func:`document_attention_mask`): attention within
        each document only, causal. CUDA: variable-length flash attention over the documents (or
        FlexAttention), cost ∝ Σ len², with what it needs computed once per micro-batch and shared by
        every layer (``bluelm_kernels.attention``); CPU: SDPA with the boolean mask built from the ids (the
        exact reference); a micro-batch of one document per row: plain causal SDPA;
      * megatron's boolean convention (True = masked out), [b, 1, sq, sk] (the generation engine).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, sdpa_choice: str = "default"):
        super().__init__(config=config)
        self.sdpa_choice = sdpa_choice  # bluelm_kernels.sdpa_choice: measure | default | cudnn | flash | efficient
        tp = config.tensor_model_parallel_size
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.scale = softmax_scale  # None: 1/sqrt(d), SDPA's default
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None, "SDPACoreAttention: bshd only"
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        dropout = self.dropout_p if self.training else 0.0
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            out = self._documents(q, k, v, attention_mask, attn_mask_type, dropout)
            return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
        mask = None if attention_mask is None else ~attention_mask
        causal = mask is None and attn_mask_type != AttnMaskType.no_mask
        def attend():
            if mask is None and dropout == 0.0 and self.sdpa_choice != "default":
                from bluelm_kernels.sdpa_choice import sdpa

                return sdpa(q, k, v, causal=causal, scale=self.scale, enable_gqa=self.heads != self.groups,
                            choose=self.sdpa_choice)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.scale, enable_gqa=self.heads != self.groups,
            )

        if dropout == 0.0:
            out = attend()
        else:  # dropout draws from the model-parallel RNG stream, like megatron-core's attention
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = attend()
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _documents(self, q, k, v, document_ids, attn_mask_type, dropout):
        from bluelm_kernels.attention import attention

        if dropout:
            raise ValueError("model.attention_dropout > 0 is not supported with packed documents "
                             "(data.reset_attention_mask / packed rows): FlexAttention has no dropout")
        if document_ids.shape != (q.shape[0], q.shape[2]):
            raise ValueError(f"document ids {tuple(document_ids.shape)} do not match the attention's "
                             f"[batch, sequence] = {(q.shape[0], q.shape[2])}")
        causal = attn_mask_type != AttnMaskType.no_mask
        return attention(q, k, v, causal=causal, document_ids=document_ids, scale=self.scale)


def document_attention_mask(document_ids: torch.Tensor, host_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What the model's ``attention_mask`` argument carries for packed rows: the [b, s] document ids
    themselves (int32, O(s) per row; they pass through megatron-core's layers and activation
    checkpointing as any tensor). The attention's per-micro-batch facts about them (bluelm_kernels.attention's
    DocumentLayout) are computed here, once, from ``host_ids`` (the loader's CPU copy: no device sync)
    when given, and every layer finds them in the cache; a block mask, where one is needed, is built
    on the first layer's call."""
    ids = document_ids.to(torch.int32)
    from bluelm_kernels.attention import register_document_layout

    register_document_layout(ids, ids if host_ids is None or not ids.is_cuda else host_ids)
    return ids
