"""The KV cache of the generation engine: per slot, preallocated once per workload.

Layout: ``k``/``v`` [layers, slots, groups, capacity, head_dim] in the model's dtype (this rank's
layers and KV groups only). A slot holds one sample; its positions 0..length-1 are valid. Why per
slot rather than paged: every row's keys are contiguous per head (the decode kernel streams them
without a block table), a slot move (compaction, sharing a prefill) is one copy, and the capacity
is sized from the work — the longest prompt + max_new_tokens of the workload, not the model's
context — so the waste is bounded by how much response lengths differ within one workload.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, slots: int, groups: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, slots, groups, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.capacity, self.groups = slots, capacity, groups
        self._splits: dict[int, int] = {}

    def splits(self, rows: int) -> int:
        """Key chunks per (row, group) for the decode attention over the first ``rows`` slots: chosen
        per batch bucket (``num_splits``), so one row at a long context still spreads over the GPU."""
        if rows not in self._splits:
            from megatron_bluelm.inference.attention import num_splits

            self._splits[rows] = num_splits(rows, self.groups, self.capacity, self.k.device)
        return self._splits[rows]

    @staticmethod
    def bytes_per_slot(layers: int, groups: int, capacity: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * groups * capacity * head_dim * torch.empty(0, dtype=dtype).element_size()

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the rows of slots ``src`` into slots ``dst`` (compaction)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def fits(self, slots: int, capacity: int) -> bool:
        return slots <= self.slots and capacity <= self.capacity
