"""The BlueLM decoder: megatron-core's GPTModel with our layer spec.

Pre-norm RMSNorm, SwiGLU MLP, GQA attention with RoPE, no linear biases, untied input/output
embeddings. Parallelism (TP / SP / PP / virtual PP) comes from megatron-core; this module only maps
our config onto ``TransformerConfig`` and adds two things GPTModel lacks:

* RoPE from ``position_ids`` when positions restart per packed document (GPTModel always uses 0..s-1);
* a loss path through our fused linear + cross-entropy kernel when the backend is ``fused``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.schema import RunConfig
from megatron_bluelm.models.embedding import use_main_grad_embedding
from megatron_bluelm.models.spec import decoder_block_spec, resolve_backend


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round the vocabulary up to a multiple of ``divisible_by`` that TP also divides.

    Unlike Megatron-LM (multiple of ``divisible_by * tp``) the padded size does not change with the
    TP degree for the usual power-of-two sizes, so one model is the same model under every layout.
    """
    multiple = math.lcm(divisible_by, tp)
    return int(math.ceil(vocab_size / multiple) * multiple)


def param_dtype(cfg: RunConfig) -> torch.dtype:
    precision = cfg.training.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def build_transformer_config(cfg: RunConfig, backend: Optional[str] = None) -> TransformerConfig:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    backend = backend or resolve_backend(m.backend)
    dtype = param_dtype(cfg)
    recompute = {}
    if t.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif t.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=t.recompute_num_layers)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        use_te_activation_func=backend == "fused",  # builds our SwiGLU module from the spec
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        perform_initialization=False,  # models/init.py initializes layout-independently
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        context_parallel_size=p.cp,
        sequence_parallel=p.sequence_parallel,
        num_layers_in_first_pipeline_stage=p.first_stage_layers,
        num_layers_in_last_pipeline_stage=p.last_stage_layers,
        calculate_per_token_loss=True,  # loss = sum over tokens / tokens of the global batch
        deallocate_pipeline_outputs=True,
        # Separate isend/irecv (not one batched call): with two pipeline ranks the previous and next
        # stage are the same peer, and only megatron-core's unbatched path keeps activations and
        # gradients from being matched to each other's receives (seen on gloo with interleaving).
        batch_p2p_comm=False,
        # Overlapped p2p (Megatron-LM's default with interleaving) races on gloo: CPU runs keep it off.
        overlap_p2p_comm=p.vpp is not None and torch.cuda.is_available(),
        **recompute,
    )


class BlueLMModel(GPTModel):
    """GPTModel plus per-token RoPE positions and an optional fused linear cross-entropy."""

    def __init__(self, *args, per_token_rope: bool = False, fused_loss: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if self.pre_process:  # the token embedding's weight gradient can go straight into main_grad
            use_main_grad_embedding(self.embedding.word_embeddings)
        self.per_token_rope = per_token_rope
        self.fused_loss = fused_loss
        self._loss_rows = None  # this forward's loss_rows, for _postprocess (GPTModel passes it no extras)

    def forward(self, *args, loss_rows: Optional[torch.Tensor] = None, **kwargs):
        """GPTModel's forward; ``loss_rows``: the flat indices of the positions with ``loss_mask > 0``
        (training/step.py makes them on the host): the fused loss then runs its kernel on those rows
        only (models/fused_loss.py). Ignored by the torch backend and off the last pipeline stage."""
        self._loss_rows = loss_rows
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._loss_rows = None

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, padding_mask=None):
        out = super()._preprocess(input_ids, position_ids, decoder_input, inference_context,
                                  packed_seq_params, padding_mask)
        if self.per_token_rope and position_ids is not None and inference_context is None:
            out = (out[0], self._rope_from_positions(position_ids)) + tuple(out[2:])
        return out

    def _rope_from_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[b, s] positions -> [s, b, 1, d] rotary angles (same layout GPTModel's RoPE returns)."""
        inv_freq = self.rotary_pos_emb.inv_freq.to(position_ids.device)
        angles = position_ids.transpose(0, 1).float()[..., None] * inv_freq  # [s, b, d/2]
        return torch.cat((angles, angles), dim=-1)[:, :, None, :]

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """With the fused loss and a loss mask: the masked loss *sum* (a scalar), else as GPTModel."""
        if not (self.fused_loss and self.post_process and labels is not None):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        from megatron_bluelm.models.fused_loss import fused_output_loss

        loss_mask = kwargs.get("loss_mask")
        return fused_output_loss(self.output_layer, hidden_states, labels, loss_mask,
                                 self._loss_rows if loss_mask is not None else None)


def build_decoder(cfg: RunConfig, vocab_size: int, *, pre_process: bool = True, post_process: bool = True,
                  vp_stage: Optional[int] = None, config: Optional[TransformerConfig] = None) -> BlueLMModel:
    backend = resolve_backend(cfg.model.backend)
    if backend == "te" and getattr(cfg.data, "reset_attention_mask", False):
        raise ConfigError("model.backend: packed documents (data.reset_attention_mask, SFT, packed multimodal "
                          "rows) run on the fused or torch backend (FlexAttention); 'te' takes no document ids")
    config = config or build_transformer_config(cfg, backend)
    return BlueLMModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(backend, config, vp_stage),
        vocab_size=padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tp),
        max_sequence_length=cfg.data.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(cfg.model.rotary_base),
        vp_stage=vp_stage,
        per_token_rope=getattr(cfg.data, "reset_position_ids", False),
        fused_loss=backend == "fused",
    )
