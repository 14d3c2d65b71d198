"""The multimodal model: ViT -> adapter -> image embeddings spliced into the BlueLM decoder's input.

Pipeline placement: the ViT and the adapter live on the first pipeline stage, next to the token
embedding; the decoder's layers are split over the stages as for text (``parallel.first_stage_layers``
/ ``last_stage_layers``, or chosen by :func:`balanced_first_stage_layers`). Only activations of the
decoder's width cross stage boundaries, so the schedule is unchanged.

Splicing: the micro-batch's tiles (all samples, image order, tile order, concatenated) go through the
ViT in one batch; the adapter's output tokens replace, in order, the decoder input at the positions
holding the ``<image>`` token (row-major over [batch, sequence]). data/images.py writes exactly
``tokens_per_tile`` ``<image>`` tokens per tile, so the counts match; a mismatch is an error.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.schema import RunConfig
from megatron_bluelm.models.adapter import VisionAdapter
from megatron_bluelm.models.decoder import build_decoder, build_transformer_config
from megatron_bluelm.models.spec import resolve_backend
from megatron_bluelm.models.vision import VisionEncoder, vision_transformer_config


class BlueLMVLM(MegatronModule):
    """One pipeline chunk of the multimodal model (``vision_model`` + ``adapter`` on the first stage)."""

    def __init__(self, cfg: RunConfig, vocab_size: int, image_token_id: int, *, pre_process: bool = True,
                 post_process: bool = True, vp_stage: Optional[int] = None):
        backend = resolve_backend(cfg.model.backend)
        lm_config = build_transformer_config(cfg, backend)
        super().__init__(config=lm_config)
        self.model_type = ModelType.encoder_or_decoder  # the schedules read it: one stack, as GPTModel
        self.share_embeddings_and_output_weights = False  # finalize_model_grads reads it (untied)
        self.pre_process, self.post_process = pre_process, post_process
        self.image_token_id = image_token_id
        self.language_model = build_decoder(cfg, vocab_size, pre_process=pre_process, post_process=post_process,
                                            vp_stage=vp_stage, config=lm_config)
        if pre_process:
            v = cfg.vision
            self.vision_model = VisionEncoder(vision_transformer_config(lm_config, v, backend), v, backend)
            # the adapter's rows are image tokens, not sequence positions: never sequence parallel
            self.adapter = VisionAdapter(dataclasses.replace(lm_config, sequence_parallel=False), v.hidden_size,
                                         v.image_size // v.patch_size, v.adapter_hidden_size)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, S, S] -> [tiles * tokens_per_tile, decoder hidden]."""
        out = self.adapter(self.vision_model(pixel_values))
        return out.reshape(-1, out.shape[-1])

    def image_slots(self, input_ids: torch.Tensor, host_input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Positions of the ``<image>`` tokens in the row-major [b, s] order (= the order of the tiles), on
        ``input_ids``' device. From ``host_input_ids`` (the loader's CPU copy of the same tokens) when
        given: ``nonzero`` on device tokens makes the host wait until the device has run everything queued
        before it (the previous micro-batch's backward), which leaves the device idle while the host then
        queues the ViT; on the host copy nothing waits and the host stays ahead."""
        if host_input_ids is None:
            return (input_ids == self.image_token_id).reshape(-1).nonzero().squeeze(1)
        if tuple(host_input_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"host tokens {tuple(host_input_ids.shape)} and device tokens {tuple(input_ids.shape)} "
                             "differ in shape")
        from bluelm_kernels.transfer import to_device

        return to_device(self._host_slots(host_input_ids), input_ids.device)

    def _host_slots(self, host_input_ids: torch.Tensor) -> torch.Tensor:
        """The ``<image>`` positions, row-major over [b, s], computed on the host."""
        return (host_input_ids.cpu() == self.image_token_id).reshape(-1).nonzero().squeeze(1)

    def _decoder_input(self, input_ids, position_ids, pixel_values, host_input_ids=None):
        embeds = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
        # embeds is [s, b, h]; the slots are found before the ViT is queued (without host_input_ids their
        # nonzero is the splice's one host sync).
        order = self.image_slots(input_ids, host_input_ids)
        n_slots = order.numel()
        n_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        if n_tiles == 0 and n_slots == 0:
            return embeds
        images = self.image_embeddings(pixel_values) if n_tiles else embeds.new_zeros(0, embeds.shape[-1])
        if images.shape[0] != n_slots:
            raise ValueError(f"multimodal batch: {n_tiles} tiles give {images.shape[0]} image embeddings but the "
                             f"tokens hold {n_slots} <image> slots (data/images.py makes them equal)")
        b, s = input_ids.shape
        images = images.to(embeds.dtype)
        if self.config.sequence_parallel:
            order, images = self._local_slots(order, images, host_input_ids, b, s)
            s = embeds.shape[0]  # this rank's sequence chunk
        flat = embeds.transpose(0, 1).reshape(b * s, -1)
        flat = flat.index_copy(0, order, images)
        return flat.view(b, s, -1).transpose(0, 1).contiguous()

    def _local_slots(self, order, images, host_input_ids, b: int, s: int):
        """Sequence parallelism: the embeddings are this TP rank's chunk of the sequence, positions
        [rank * s / tp, (rank + 1) * s / tp) of every row, [s / tp, b, h]. Every TP rank ran the same ViT
        on all tiles; each splices the image embeddings whose slots fall in its chunk, at their [b, s / tp]
        row-major index. The ranks use different rows of ``images``, so its gradient is their sum: the
        all-reduce of ``copy_to_tensor_model_parallel_region``'s backward (the ViT's own backward then
        sees the same gradient on every rank, as without sequence parallelism)."""
        from megatron.core import parallel_state, tensor_parallel

        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        chunk = s // tp
        images = tensor_parallel.copy_to_tensor_model_parallel_region(images)
        slots = order.cpu() if host_input_ids is None else self._host_slots(host_input_ids)
        row, pos = slots // s, slots % s
        mine = ((pos >= rank * chunk) & (pos < (rank + 1) * chunk)).nonzero().squeeze(1)  # host: no sync
        local = row[mine] * chunk + pos[mine] - rank * chunk
        from bluelm_kernels.transfer import to_device

        return to_device(local, order.device), images[to_device(mine, images.device)]

    def forward(self, input_ids, position_ids, attention_mask, labels=None, loss_mask=None,
                pixel_values: Optional[torch.Tensor] = None, host_input_ids: Optional[torch.Tensor] = None,
                **kwargs):
        """``host_input_ids``: the loader's CPU copy of ``input_ids`` (optional; see :meth:`image_slots`)."""
        decoder_input = None
        if self.pre_process:
            decoder_input = self._decoder_input(input_ids, position_ids, pixel_values, host_input_ids)
        return self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, loss_mask=loss_mask, **kwargs)


def build_vlm(cfg: RunConfig, vocab_size: int, image_token_id: int, *, pre_process: bool = True,
              post_process: bool = True, vp_stage: Optional[int] = None) -> BlueLMVLM:
    model = BlueLMVLM(cfg, vocab_size, image_token_id, pre_process=pre_process, post_process=post_process,
                      vp_stage=vp_stage)
    apply_freeze(model, cfg.vision.freeze)
    return model


def apply_freeze(model: BlueLMVLM, parts) -> None:
    """``requires_grad = False`` on the frozen parts, before DDP and the optimizer see the model."""
    modules = {"vision": getattr(model, "vision_model", None), "adapter": getattr(model, "adapter", None),
               "decoder": model.language_model}
    for part in parts:
        if modules[part] is not None:
            modules[part].requires_grad_(False)


# ------------------------------------------------------------------------- pipeline cost model

def vision_flops_per_tile(v) -> float:
    """Forward FLOPs of the ViT + adapter for one tile (matmuls and attention; norms ignored)."""
    patches, h, f = (v.image_size // v.patch_size) ** 2, v.hidden_size, v.ffn_hidden_size
    per_layer = 2 * patches * (4 * h * h + 2 * h * f) + 4 * patches * patches * h
    conv = 2 * patches * 3 * v.patch_size**2 * h
    return v.num_layers * per_layer + conv


def adapter_flops_per_tile(v, decoder_hidden: int) -> float:
    """Forward FLOPs of the adapter's two matmuls for one tile (4 x ViT width -> a -> decoder width)."""
    a = v.adapter_hidden_size or decoder_hidden
    return v.tokens_per_tile * 2 * (4 * v.hidden_size * a + a * decoder_hidden)


def decoder_layer_flops(m, seq_length: int) -> float:
    """Forward FLOPs of one decoder layer for one sequence (GQA attention, SwiGLU MLP)."""
    h, d = m.hidden_size, m.hidden_size // m.num_attention_heads
    qkv = h * (m.num_attention_heads + 2 * m.num_query_groups) * d
    per_token = 2 * (qkv + h * h + 3 * h * m.ffn_hidden_size) + 4 * seq_length * h
    return seq_length * per_token


def resolve_vision_layout(cfg: RunConfig) -> None:
    """Resolve the vision preset, check it against TP, and choose the first pipeline stage's decoder
    layers by the cost model below unless a split is given (needs the model preset applied). Shared
    by training (stages/multimodal.py) and generation (inference/model.py)."""
    v, p = cfg.vision, cfg.parallel
    v.resolve()
    v.check(p.tp)
    # With virtual stages the layers split evenly over pp x vpp chunks (megatron-core's rule; the ViT
    # adds to the first chunk), so the cost model's uneven first stage does not apply.
    if (p.pp > 1 and p.vpp is None and p.first_stage_layers is None and p.last_stage_layers is None
            and v.balance_pipeline):
        p.first_stage_layers = balanced_first_stage_layers(cfg)


def balanced_first_stage_layers(cfg: RunConfig, tiles_per_sample: Optional[float] = None) -> Optional[int]:
    """Decoder layers for the first pipeline stage so that (ViT + adapter + its layers) costs about
    what every other stage's layers cost.

    Cost model: forward FLOPs per sample. The ViT costs ``tiles_per_sample`` (default: the worst case,
    ``max_tiles`` + thumbnail) x :func:`vision_flops_per_tile`, expressed in decoder layers of
    ``data.seq_length`` tokens; the first stage gets f layers, the others (L - f) / (pp - 1) each, with
    f >= 1 and (L - f) divisible by pp - 1, minimizing the slowest stage. None when pp == 1."""
    p, m, v = cfg.parallel, cfg.model, cfg.vision
    if p.pp == 1:
        return None
    tiles = tiles_per_sample if tiles_per_sample is not None else v.max_tiles + int(v.thumbnail)
    vit_layers = tiles * vision_flops_per_tile(v) / decoder_layer_flops(m, cfg.data.seq_length)
    best = None
    for first in range(1, m.num_layers):
        rest = m.num_layers - first
        if rest % (p.pp - 1) or rest // (p.pp - 1) == 0:
            continue
        slowest = max(first + vit_layers, rest / (p.pp - 1))
        if best is None or slowest < best[0] - 1e-9:
            best = (slowest, first)
    if best is None:
        raise ConfigError(f"model.num_layers ({m.num_layers}) cannot be split over parallel.pp ({p.pp}) stages "
                          "with at least one layer each")
    return best[1]


def describe_split(cfg: RunConfig, first: int) -> str:
    rest = (cfg.model.num_layers - first) / max(cfg.parallel.pp - 1, 1)
    return f"pipeline split: first stage ViT + adapter + {first} decoder layers, then {math.floor(rest)} per stage"
