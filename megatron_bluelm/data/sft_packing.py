"""Packed SFT rows: whole samples concatenated into rows of seq_length, each with its own boundaries.

A row holds samples in a seeded shuffled order, first fit in sequence (a sample that does not fit
starts the next row; one longer than a row is truncated). Per row, batch keys as the training loop
reads them (same as ``PretrainDataset``):

    tokens, labels      [s]      next-token pairs; the tail is padding
    loss_mask           [s]      1 where the *label* is an assistant token of the same sample
    position_ids        [s]      restart at 0 for every sample (RoPE sees each sample alone)
    document_ids        [s]      which sample of the row each position belongs to (padding: one more);
                                 the attention masks across samples from these (models/attention.py),
                                 so no [s, s] mask is ever built by the data pipeline

So a packed row trains exactly like its samples one by one (tested in tests/sft/ and tests/data/).
Samples longer than a row are cut to it; ``PackedSFTDataset.truncated`` counts them (and a warning
says how many at build time).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.sft import MASK_SUFFIX, TEXT_SUFFIX


def mask_prefix(text_prefix: str) -> str:
    if not text_prefix.endswith(TEXT_SUFFIX):
        raise ConfigError(f"data.prefix: an SFT prefix ends with '{TEXT_SUFFIX}' (written by "
                          f"tools/preprocess_data.py --chat), got '{text_prefix}'")
    return text_prefix[: -len(TEXT_SUFFIX)] + MASK_SUFFIX


def pack_rows(lengths: np.ndarray, order: np.ndarray, row_tokens: int) -> list[list[int]]:
    """Greedy in-order packing of samples (indices in ``order``) into rows of ``row_tokens``."""
    rows, current, used = [], [], 0
    for i in order:
        n = min(int(lengths[i]), row_tokens)
        if current and used + n > row_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(int(i))
        used += n
    if current:
        rows.append(current)
    return rows


class PackedSFTDataset(torch.utils.data.Dataset):
    """``num_samples`` packed rows over the documents ``doc_range`` of one SFT prefix."""

    def __init__(self, prefix: str, seq_length: int, doc_range: tuple[int, int], num_samples: int,
                 seed: int, pad_id: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.text, self.mask = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
        if not np.array_equal(self.text.sequence_lengths, self.mask.sequence_lengths):
            raise ConfigError(f"data.prefix: '{prefix}' and its loss mask differ in sample lengths; "
                              "re-run tools/preprocess_data.py --chat")
        self.seq_length, self.pad_id = seq_length, pad_id
        lengths = self.text.sequence_lengths
        docs = np.arange(*doc_range)
        if len(docs) == 0:
            raise ConfigError(f"data.split: no SFT samples of '{prefix}' in this split")
        self.rows: list[list[int]] = []
        # Each sample is in every epoch once; cut to the row when longer (seq_length + 1 tokens).
        self.truncated = int(np.sum(lengths[docs] > seq_length + 1))
        if self.truncated:
            logging.getLogger(__name__).warning(
                "SFT data '%s': %d of %d samples are longer than data.seq_length + 1 (%d) and are truncated",
                prefix, self.truncated, len(docs), seq_length + 1)
        rng = np.random.default_rng(seed)
        while len(self.rows) < num_samples:  # epochs, each reshuffled
            self.rows += pack_rows(lengths, rng.permutation(docs), seq_length + 1)
        self.rows = self.rows[:num_samples]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict:
        return build_row([(self.text[i], self.mask[i]) for i in self.rows[int(idx)]],
                         self.seq_length, self.pad_id)


def build_row(samples, seq_length: int, pad_id: int) -> dict:
    """samples: [(tokens, loss mask)] -> the batch keys of one packed row (see module docstring)."""
    n = seq_length + 1
    tokens = np.full(n, pad_id, dtype=np.int64)
    loss = np.zeros(n, dtype=np.float32)
    doc = np.full(n, len(samples), dtype=np.int64)  # padding: a document of its own
    pos = np.zeros(n, dtype=np.int64)
    at = 0
    for d, (t, m) in enumerate(samples):
        k = min(len(t), n - at)
        tokens[at:at + k], loss[at:at + k], doc[at:at + k] = t[:k], m[:k], d
        pos[at:at + k] = np.arange(k)
        at += k
    pos[at:] = np.arange(n - at)
    same = doc[1:] == doc[:-1]  # a label from the next sample is never learned
    return {
        "tokens": torch.from_numpy(tokens[:-1]),
        "labels": torch.from_numpy(tokens[1:]),
        "loss_mask": torch.from_numpy(loss[1:] * same),
        "position_ids": torch.from_numpy(pos[:-1]),
        "document_ids": torch.from_numpy(doc[:-1]),
    }


def split_range(num_docs: int, split: str, which: int) -> tuple[int, int]:
    """Document range of split ``which`` (0 train, 1 valid, 2 test) with megatron-core's arithmetic."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[which]
    if bounds is None:
        return (0, 0)
    return round(bounds[0] * num_docs), round(bounds[1] * num_docs)


def build_sft_datasets(cfg, tok, *, seq_length: int, num_samples, seed: int):
    """(train, valid, test) PackedSFTDatasets of ``cfg.prefix``; an empty split is None."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(cfg.prefix)  # alive while its mmap-backed lengths are read
    n_docs = len(index.sequence_lengths)
    out = []
    for which, count in enumerate(num_samples):
        lo, hi = split_range(n_docs, cfg.split, which)
        out.append(PackedSFTDataset(cfg.prefix, seq_length, (lo, hi), count, seed + which, tok.pad)
                   if hi > lo and count > 0 else None)
    return tuple(out)
