"""Output layer + cross-entropy through ``bluelm_kernels.fused_linear_cross_entropy``: the [tokens, vocab]
logits are never materialized (at vocab 100k and seq 4096 that tensor alone is 1.6 GB in fp32).

With a loss mask the kernel returns the masked loss *sum* and computes its gradients during the
forward pass (three matmuls, like the unfused path); without one it returns per-token losses [b, s].
Tensor parallel: the weight is this rank's vocab shard; the kernel all-reduces the softmax statistics
and, in backward, the hidden-state gradient (megatron's column-parallel output layer semantics).

``loss_rows`` (with a loss mask): the flat row indices (labels' order) whose ``loss_mask > 0``, made on
the host from the loader's CPU mask (training/step.py), so no device ``nonzero`` makes the host wait.
Only those rows go through the kernel: a masked row is an ignore_index row, whose loss and gradients
are exactly 0, but the kernel still runs its GEMMs (logits, grad_h, grad_W) on it. In multimodal rows
most positions are ``<image>`` and prompt tokens without a loss. The gather's backward puts the kept
rows' gradient into a zero hidden-state gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

IGNORE_INDEX = -100


def fused_output_loss(output_layer, hidden_states: torch.Tensor, labels: torch.Tensor,
                      loss_mask: Optional[torch.Tensor] = None,
                      loss_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    from bluelm_kernels.cross_entropy import fused_linear_cross_entropy

    if loss_rows is not None and loss_mask is None:
        raise ValueError("fused_output_loss: loss_rows select the rows of a loss mask; no loss_mask was given")
    if output_layer.sequence_parallel:
        # The kernel all-reduces grad_hidden itself, so the gather's backward must only split.
        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
    b, s = labels.shape
    tp_group = output_layer.tp_group if output_layer.tp_group.size() > 1 else None
    if loss_mask is None:
        hidden = hidden_states.transpose(0, 1).reshape(b * s, -1)  # [s, b, h] -> rows in labels' order
        loss = fused_linear_cross_entropy(hidden, output_layer.weight, labels.reshape(-1), tp_group=tp_group)
        return loss.view(b, s)
    masked = torch.where(loss_mask.reshape(-1) > 0, labels.reshape(-1), IGNORE_INDEX)
    if loss_rows is None:
        hidden = hidden_states.transpose(0, 1).reshape(b * s, -1)
    else:
        if loss_rows.dim() != 1 or loss_rows.dtype != torch.int64:
            raise ValueError(f"fused_output_loss: loss_rows must be 1-d int64 row indices, got "
                             f"{tuple(loss_rows.shape)} {loss_rows.dtype}")
        # Gathered straight from the [s, b, h] rows (no transposed copy of all of them): labels' row
        # r = i * s + j is hidden row j * b + i.
        src = loss_rows if b == 1 else (loss_rows % s) * b + torch.div(loss_rows, s, rounding_mode="floor")
        hidden = hidden_states.reshape(s * b, -1).index_select(0, src)
        masked = masked.index_select(0, loss_rows)
    return fused_linear_cross_entropy(hidden, output_layer.weight, masked, ignore_index=IGNORE_INDEX,
                                      tp_group=tp_group, reduction="sum",
                                      weight_grad_to=_main_grad_sink(output_layer))


def _main_grad_sink(output_layer):
    """With the weight-gradient fusion on (``training/model_setup.use_fused_wgrad_accumulation`` set
    ``gradient_accumulation_fusion`` on the output layer, whose weight DDP gave an fp32 ``main_grad``):
    the loss's weight gradient goes into ``main_grad`` in one pass (``scaled_accumulate_``: the fp32
    sum of ``grad_w * grad_out``), and autograd gets megatron-core's placeholder, as its fused linears
    and the embedding (models/embedding.py) hand it. Otherwise None: autograd gets ``grad_w * grad_out``
    (bf16) and DDP's hook adds it to ``main_grad``, a product pass and a mixed-dtype add that PyTorch
    runs unvectorized (for the 100k x 2560 output layer on an H200: 1.51 ms a micro-batch against 0.65,
    ``tools/bench/grad_passes_bench.py``)."""
    weight = output_layer.weight
    if not (getattr(output_layer, "gradient_accumulation_fusion", False) and hasattr(weight, "main_grad")):
        return None

    def sink(grad_w, grad_out):
        from bluelm_kernels.cross_entropy import scaled_accumulate_
        from megatron_bluelm.models.embedding import placeholder_grad

        scaled_accumulate_(weight.main_grad, grad_w, grad_out)
        if not hasattr(weight, "grad_added_to_main_grad"):  # megatron-core's rule: no DDP flag, no placeholder
            return None
        weight.grad_added_to_main_grad = True
        return placeholder_grad(weight)

    return sink
