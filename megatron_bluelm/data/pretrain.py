"""Pretraining datasets: megatron-core GPTDataset / BlendedDataset built from a DataConfig.

Packing is megatron-core's: documents are concatenated (in a seeded shuffled order) and cut into
rows of seq_length + 1 tokens, so a row may hold several documents separated by EOD. With
``data.reset_attention_mask`` a row also carries ``document_ids`` [s] (the EOD closes its document),
which the attention turns into per-document masking (models/attention.py); with
``data.reset_position_ids`` positions restart after each EOD (megatron-core's own position ids). The sample,
shuffle and blend indices are cached under `cache_dir/<fingerprint>`, where the fingerprint
covers the .idx files' size and mtime, so re-preprocessing a prefix never reuses stale indices.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from megatron_bluelm.config.data import DataConfig, MixtureSource, check_prefix
from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.mixture import SourcePlan, exact_blend_weights, plan_counts

logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)


class _Builder:
    """Lazy import shim: megatron-core's builder, made safe for one process without dist init."""

    @staticmethod
    def make(dataset_cls, sizes, config):
        from megatron.core.datasets.blended_dataset import BlendedDataset
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )

        class Builder(BlendedMegatronDatasetBuilder):
            @staticmethod
            def build_generic_dataset(cls_, is_built_on_rank, synchronize_ranks, *args):
                # BlendedDataset calls torch.distributed.get_rank() on a cache miss even when
                # torch.distributed is not initialized; single-process runs build it in memory.
                if cls_ is BlendedDataset and not torch.distributed.is_initialized():
                    args = (*args[:-1], replace(args[-1], path_to_cache=None))
                return BlendedMegatronDatasetBuilder.build_generic_dataset(
                    cls_, is_built_on_rank, synchronize_ranks, *args
                )

        # Every rank builds (rank 0 first, then a barrier, then the others read its cache).
        return Builder(dataset_cls, list(sizes), lambda: True, config)


def _fingerprint(prefixes: list[str], tok) -> str:
    h = hashlib.sha256(tok.unique_identifiers["sha256"].encode())
    for p in prefixes:
        st = os.stat(p + ".idx")
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _gpt_config(cfg: DataConfig, tok, seq_length: int, seed: int, blend, cache: str | None):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=cfg.split if blend is not None else None,
        path_to_cache=cache,
        tokenizer=tok,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        # Never a dense [s, s] mask: document_ids (below) carry the documents to the attention.
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )


def train_split_tokens(prefix: str, split: str) -> int:
    """Tokens in a prefix's train split, with megatron-core's own split arithmetic."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)  # keep it alive: sequence_lengths is a view of its mmap
    lengths = ds.sequence_lengths
    beg, end = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[0] or (0.0, 0.0)
    n = len(lengths)
    return int(np.sum(lengths[round(beg * n) : round(end * n)], dtype=np.int64))


def _drop_empty_splits(config, prefixes: list[str]) -> None:
    """A split with no documents in some source becomes None (megatron-core would loop forever
    looking for tokens); the other splits keep their exact document ranges."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for p in prefixes:
        ds = IndexedDataset(p)
        n = len(ds.sequence_lengths)
        for i, bounds in enumerate(config.split_matrix):
            if bounds is not None and round(bounds[0] * n) >= round(bounds[1] * n):
                logging.getLogger(__name__).warning(
                    "data.split '%s': split %d of '%s' (%d documents) is empty; it is disabled",
                    config.split, i, p, n,
                )
                config.split_matrix[i] = None


def plan_mixture(sources: list[MixtureSource], split: str, seq_length: int, train_samples: int):
    """Exact per-source training sample counts (see data/mixture.py for the rules)."""
    tokens = [train_split_tokens(s.prefix, split) for s in sources]
    per_epoch = [max(t - 1, 0) // seq_length for t in tokens]
    counts = plan_counts(sources, per_epoch, train_samples)
    return [SourcePlan(s.name, s.prefix, t, e, n) for s, t, e, n in zip(sources, tokens, per_epoch, counts)]


def _resolve_sources(cfg: DataConfig, seq_length: int, seed: int) -> list[MixtureSource]:
    from megatron_bluelm.data.quality import apply_quality

    field = "data.mixture" if cfg.mixture else "data.prefix"
    sources = cfg.sources()
    for s in sources:
        check_prefix(s.prefix, field)
    return [apply_quality(s, cfg.cache_dir) if s.quality else s for s in sources]


@contextmanager
def _announce_index_build(num_samples, cache) -> Iterator[None]:
    """megatron-core builds (or reads back) the shuffle and sample indices silently, which takes tens of
    seconds on large corpora: say so, and how long it took (the first rank only)."""
    first = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if first:
        where = f" (index cache: {cache})" if cache else ""
        print(f"data: building dataset indices for {', '.join(map(str, num_samples))} train/valid/test "
              f"samples{where} ...", flush=True)
    start = time.perf_counter()
    yield
    if first:
        print(f"data: dataset indices ready in {time.perf_counter() - start:.1f} s", flush=True)


def build_megatron_datasets(cfg: DataConfig, tok, *, seq_length: int, num_samples, seed: int):
    """(train, valid, test) megatron-core datasets (None for an empty split) and the mixture plan."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    if cfg.mock:
        config = _gpt_config(cfg, tok, seq_length, seed, None, None)
        with _announce_index_build(num_samples, None):
            return _Builder.make(MockGPTDataset, num_samples, config).build(), None
    sources = _resolve_sources(cfg, seq_length, seed)
    prefixes = [s.prefix for s in sources]
    cache = os.path.join(cfg.cache_dir, _fingerprint(prefixes, tok)) if cfg.cache_dir else None
    plan = None
    if len(sources) == 1:
        blend = (prefixes, None)
    else:
        plan = plan_mixture(sources, cfg.split, seq_length, num_samples[0])
        blend = (prefixes, exact_blend_weights([p.samples for p in plan]))
    config = _gpt_config(cfg, tok, seq_length, seed, blend, cache)
    _drop_empty_splits(config, prefixes)
    try:
        with _announce_index_build(num_samples, cache):
            datasets = _Builder.make(GPTDataset, num_samples, config).build()
    except OSError as e:
        raise ConfigError(f"data.cache_dir: cannot write index cache under '{cache}': {e}") from e
    return datasets, plan


class PretrainDataset(torch.utils.data.Dataset):
    """A megatron-core GPT dataset with the batch keys our training loop reads."""

    def __init__(self, megatron_dataset, eod: int, reset_attention_mask: bool, plan=None):
        self.megatron = megatron_dataset
        self.eod = eod
        self.reset_attention_mask = reset_attention_mask
        self.plan = plan  # list[SourcePlan] for a blend's train split, else None

    def __len__(self) -> int:
        return len(self.megatron)

    def __getitem__(self, idx: int) -> dict:
        s = self.megatron[int(idx)]
        out = {k: s[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
        if self.reset_attention_mask:
            is_eod = (s["tokens"] == self.eod).long()
            # The EOD closes its document: ids count the EODs strictly before each position.
            out["document_ids"] = torch.cumsum(is_eod, 0) - is_eod
        return out

    def source_counts(self) -> list[int]:
        """Samples drawn per blend source (megatron-core's own blend index), or [len] for one source."""
        index = getattr(self.megatron, "dataset_index", None)
        if index is None:
            return [len(self)]
        return np.bincount(np.asarray(index), minlength=len(self.megatron.datasets)).tolist()


def build_pretrain_datasets(cfg: DataConfig, tok, *, seq_length: int, num_samples, seed: int):
    """(train, valid, test) PretrainDatasets; a split with no documents is None."""
    if len(num_samples) != 3:
        raise ConfigError(f"num_samples: expected (train, valid, test), got {num_samples!r}")
    datasets, plan = build_megatron_datasets(
        cfg, tok, seq_length=seq_length, num_samples=tuple(num_samples), seed=seed
    )
    wrap = [
        PretrainDataset(d, tok.eod, cfg.reset_attention_mask, plan if i == 0 else None)
        if d is not None else None
        for i, d in enumerate(datasets)
    ]
    return tuple(wrap)
