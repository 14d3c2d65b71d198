"""Deterministic, resumable batches with Megatron's pretraining-sampler semantics.

The global sample stream is 0, 1, 2, ... of the (already shuffled) dataset. Starting at
`consumed_samples`, each global step takes the next micro_batch_size * dp_size samples and
data-parallel rank r gets the slice [r * mbs, (r + 1) * mbs) of it. Hence one rank running N
micro-batches sees exactly the union of what N / dp_size ranks see, and resuming needs only
`consumed_samples` (the checkpointed count of samples consumed by all ranks together).

Exhaustion: when the next global step would run past the end of the dataset, the iterator raises
DataExhaustedError (no silent epoch wrap: megatron-core already sized the dataset to the
num_samples it was built for, and repeats data only by its own seeded epochs).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from megatron_bluelm.config.errors import ConfigError


class DataExhaustedError(RuntimeError):
    pass


class PretrainingBatchSampler:
    """Yields this rank's sample indices per micro-batch, from `consumed_samples` on."""

    def __init__(self, total: int, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ConfigError(
                f"loader: need micro_batch_size > 0 and 0 <= dp_rank < dp_size, got "
                f"{micro_batch_size}, {dp_rank}, {dp_size}"
            )
        if consumed < 0:
            raise ConfigError(f"loader: consumed_samples must be >= 0, got {consumed}")
        self.total, self.consumed = total, consumed
        self.mbs, self.rank, self.global_size = micro_batch_size, dp_rank, micro_batch_size * dp_size

    def __iter__(self):
        start = self.consumed
        while start + self.global_size <= self.total:
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))
            start += self.global_size

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // self.global_size)


def build_data_iterator(
    dataset,
    *,
    micro_batch_size: int,
    consumed_samples: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
    collate_fn=None,  # None: torch's default (stacks); multimodal batches concatenate their tiles
):
    """An endless-until-exhausted iterator of batches (dicts of CPU tensors) for this DP rank."""
    if dataset is None:
        raise ConfigError("loader: no dataset for this split (its share in data.split is 0)")
    sampler = PretrainingBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        # page-locked batches on CUDA: copies from pageable memory wait for the device's queue (training/step.py)
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    return _Batches(loader, len(dataset), consumed_samples, micro_batch_size * dp_size)


class _Batches:
    def __init__(self, loader, total: int, consumed: int, global_size: int):
        self._it, self.total, self.consumed, self.global_size = iter(loader), total, consumed, global_size

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        try:
            batch = next(self._it)
        except StopIteration:
            raise DataExhaustedError(
                f"dataset exhausted: it holds {self.total:,} samples and {self.consumed:,} are consumed; "
                f"a global batch needs {self.global_size:,}. Build the datasets with a larger num_samples."
            ) from None
        self.consumed += self.global_size
        if "loss_mask" in batch:
            batch["loss_mask"] = batch["loss_mask"].float()
        return batch

