"""Per-document quality scores: drop documents below a threshold, repeat the best ones.

A source's `quality:` block in the mixture YAML:
    quality: {scores: PATH.npy, min: 0.3, upsample: [[0.8, 2], [0.95, 3]]}
`scores` is a .npy float array with one score per document of the prefix (default PREFIX.scores.npy),
written by your scoring job in document order. Documents scoring below `min` are dropped;
a document scoring >= t is repeated by the largest factor whose threshold t it reaches.
The filtered dataset is materialized once as a new indexed dataset under cache_dir/quality
(keyed by the inputs' sizes/mtimes and the rule), so megatron-core sees an ordinary prefix.
Repeats are written next to each other, so train/valid/test never share a document except at
the single split boundary.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import numpy as np
import torch

from megatron_bluelm.config.data import MixtureSource
from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.indexed_writer import IndexedWriter, committed


def repeat_counts(scores: np.ndarray, minimum: float | None, upsample: list) -> np.ndarray:
    """Copies of each document: 0 below `minimum`, else the largest factor whose threshold it meets."""
    reps = np.ones(len(scores), dtype=np.int64)
    for threshold, factor in sorted(upsample or [], key=lambda tf: tf[1]):
        reps[scores >= threshold] = int(factor)
    if minimum is not None:
        reps[scores < minimum] = 0
    return reps


def _load_scores(src: MixtureSource, num_docs: int) -> tuple[str, np.ndarray]:
    path = src.quality.get("scores") or src.prefix + ".scores.npy"
    if not os.path.isfile(path):
        raise ConfigError(f"mixture source '{src.name}': quality scores file not found: '{path}'")
    scores = np.load(path)
    if scores.shape != (num_docs,):
        raise ConfigError(
            f"mixture source '{src.name}': '{path}' has {scores.shape} scores, expected ({num_docs},), "
            "one per document"
        )
    return path, scores


def apply_quality(src: MixtureSource, cache_dir: str) -> MixtureSource:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(src.prefix)
    doc_index = ds.document_indices  # sequence boundaries of each document
    path, scores = _load_scores(src, len(doc_index) - 1)
    reps = repeat_counts(scores, src.quality.get("min"), src.quality.get("upsample"))
    if reps.sum() == 0:
        raise ConfigError(f"mixture source '{src.name}': the quality threshold drops every document")
    key = json.dumps([os.path.abspath(src.prefix), _stamp(src.prefix + ".idx"), _stamp(path), src.quality],
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = os.path.join(cache_dir or "outputs/cache/data", "quality", f"{src.name}-{digest}_text_document")
    dist = torch.distributed.is_initialized()
    if (not dist or torch.distributed.get_rank() == 0) and not os.path.isfile(out + ".idx"):
        _write_filtered(ds, doc_index, reps, out)
    if dist:
        torch.distributed.barrier()
    return replace(src, prefix=out, quality=None)


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _write_filtered(ds, doc_index: np.ndarray, reps: np.ndarray, out: str) -> None:
    lengths = ds.sequence_lengths
    writer = IndexedWriter(out, ds.index.dtype)
    with committed(writer):
        for d in np.nonzero(reps)[0]:
            beg, end = int(doc_index[d]), int(doc_index[d + 1])
            seqs = [ds[i] for i in range(beg, end)]
            tokens = np.concatenate(seqs) if seqs else np.zeros(0, ds.index.dtype)
            for _ in range(int(reps[d])):
                writer.add(tokens, lengths[beg:end], np.array([end - beg]))
