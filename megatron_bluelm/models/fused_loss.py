"""Output layer + cross-entropy through ``bluelm_kernels.fused_linear_cross_entropy``: the [tokens, vocab]
logits are never materialized (at vocab 100k and seq 4096 that tensor alone is 1.6 GB in fp32).

With a loss mask the kernel returns the masked loss *sum* and computes its gradients during the
forward pass (three matmuls, like the unfused path); without one it returns per-token losses [b, s].
Tensor parallel: the weight is this rank's vocab shard; the kernel all-reduces the softmax statistics
and, in backward, the hidden-state gradient (megatron's column-parallel output layer semantics).
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

IGNORE_INDEX = -100


def fused_output_loss(output_layer, hidden_states: torch.Tensor, labels: torch.Tensor,
                      loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    from bluelm_kernels.cross_entropy import fused_linear_cross_entropy

    if output_layer.sequence_parallel:
        # The kernel all-reduces grad_hidden itself, so the gather's backward must only split.
        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
    b, s = labels.shape
    hidden = hidden_states.transpose(0, 1).reshape(b * s, -1)  # [s, b, h] -> rows in labels' order
    tp_group = output_layer.tp_group if output_layer.tp_group.size() > 1 else None
    if loss_mask is None:
        loss = fused_linear_cross_entropy(hidden, output_layer.weight, labels.reshape(-1), tp_group=tp_group)
        return loss.view(b, s)
    masked = torch.where(loss_mask.reshape(-1) > 0, labels.reshape(-1), IGNORE_INDEX)
    return fused_linear_cross_entropy(hidden, output_layer.weight, masked, ignore_index=IGNORE_INDEX,
                                      tp_group=tp_group, reduction="sum")
