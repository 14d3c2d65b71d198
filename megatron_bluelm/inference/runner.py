"""One forward step of our megatron model with megatron-core's static KV cache, under TP and PP.

The KV cache is megatron-core's own: ``StaticInferenceContext`` passed to ``GPTModel.forward``, which
megatron-core's ``SelfAttention`` fills layer by layer (``_adjust_key_value_for_inference``). What we
add around it, and why:

* **Left padding with per-sample positions.** Prompts of different lengths share one cache, so they
  are left-padded to the longest. megatron-core gives every row the RoPE position of its cache slot;
  we instead hand the model rotary angles of ``slot - pad_b`` per row (``PerSampleRope``), so each
  prompt sees exactly the positions it would alone (0, 1, 2, ...): batched == unbatched, and the
  first real token of every prompt is at position 0 like in HF transformers.
* **An explicit attention mask** ([b, 1, q, k], True = masked): causal, padded keys masked. A pad
  query attends to itself only (a fully masked row would be NaN, and NaN values in the cache poison
  later rows even at weight 0). Needed in decode too: without a mask our SDPA core would use
  ``is_causal`` with top-left alignment, wrong for one query against k keys.
* **Pipeline parallelism**: each stage runs its layers on its own cache; hidden states go to the next
  stage with plain send/recv over the pipeline group. The last stage returns the (TP-gathered) logits.
* **Images** (the multimodal model): the prefill step gets the prompts' tiles, which the first stage's
  ViT + adapter turn into embeddings spliced at the ``<image>`` slots; their keys and values go into
  the cache like any token's, so decode steps feed text tokens only and never run the ViT again.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext


def attention_mask(pad: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[b, 1, end-start, end] boolean mask (True = masked) for query slots start..end-1."""
    q = torch.arange(start, end, device=pad.device)[:, None]
    k = torch.arange(end, device=pad.device)[None, :]
    causal = k > q
    padded_key = k[None] < pad[:, None, None]  # [b, 1, end]
    mask = causal[None] | padded_key
    mask &= ~(k == q)[None]  # every query may see itself: no all-masked row
    return mask[:, None]


@contextmanager
def per_sample_rope(model: torch.nn.Module, pad: torch.Tensor):
    """Make ``model.rotary_pos_emb`` return angles of position ``slot - pad[b]`` for row b.

    Shape [slots, b, 1, dim] instead of megatron-core's [slots, 1, 1, dim]; the attention slices the
    slot dimension for the cache exactly as before. For pad = 0 the angles are bitwise megatron-core's.
    """
    rope = getattr(getattr(model, "language_model", model), "rotary_pos_emb", None)
    if rope is None:  # a middle pipeline stage has no embedding: the attention gets no RoPE from it
        yield
        return

    def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        inv_freq = rope.inv_freq.to(pad.device)
        slots = torch.arange(max_seq_len, device=pad.device, dtype=inv_freq.dtype) + offset
        pos = slots[:, None] - pad[None, :].to(inv_freq.dtype)  # [s, b]
        freqs = pos[..., None] * inv_freq  # same products as megatron-core's torch.outer
        return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]

    rope.forward = forward
    try:
        yield
    finally:
        del rope.forward


class ModelRunner:
    """Runs prefill / decode steps of one model chunk (no virtual pipeline) of this rank."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None):
        self.model = model.eval()
        # the pipeline's hidden states travel in the model's dtype (bf16 on GPU)
        self.device, self.dtype = device, dtype or next(model.parameters()).dtype
        self.hidden = model.config.hidden_size
        self.context: StaticInferenceContext | None = None
        self.pad: torch.Tensor | None = None

    @property
    def is_first_stage(self) -> bool:
        return parallel_state.is_pipeline_first_stage(ignore_virtual=True)

    @property
    def is_last_stage(self) -> bool:
        return parallel_state.is_pipeline_last_stage(ignore_virtual=True)

    def start(self, pad: torch.Tensor, total_slots: int) -> None:
        """A new batch: ``pad[b]`` = left-padding slots of row b; a fresh cache of ``total_slots``."""
        self.context = StaticInferenceContext(len(pad), total_slots)
        self.pad = pad.to(self.device)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor | None:
        """Feed tokens [b, q] at the next q cache slots; the last stage returns logits [b, vocab]
        of the last slot (other stages return None). Every rank of the model must call it.
        ``pixel_values`` (multimodal prefill, first stage): the tiles of the ``<image>`` slots."""
        start = self.context.sequence_len_offset
        end = start + tokens.shape[1]
        mask = attention_mask(self.pad, start, end)
        if not self.is_first_stage:
            self.model.set_input_tensor(self._recv(tokens.shape))
        images = {} if pixel_values is None else {"pixel_values": pixel_values.to(self.device)}
        with per_sample_rope(self.model, self.pad):
            out = self.model(tokens.to(self.device), None, mask, inference_context=self.context,
                             runtime_gather_output=True, **images)
        if not self.is_last_stage:
            self._send(out)
        self.context.sequence_len_offset = end
        self.context.enable_decode_mode()
        return out[:, -1, :].float() if self.is_last_stage else None

    def _recv(self, shape) -> torch.Tensor:
        b, q = shape
        buf = torch.empty(q, b, self.hidden, dtype=self.dtype, device=self.device)
        dist.recv(buf, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        return buf

    def _send(self, hidden: torch.Tensor) -> None:
        dist.send(hidden.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
