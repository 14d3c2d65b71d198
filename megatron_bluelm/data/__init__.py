"""Data: tokenizer, JSONL preprocessing, mixtures with key-data resampling, packed loading.

Public API (used by the training loop):
    load_tokenizer(path) -> Tokenizer
    build_pretrain_datasets(cfg, tok, *, seq_length, num_samples, seed) -> (train, valid, test)
    build_data_iterator(dataset, *, micro_batch_size, consumed_samples, dp_rank, dp_size)
Imports are lazy so tokenizer worker processes do not pay for torch / megatron-core.
"""
from megatron_bluelm.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "DataExhaustedError",
    "Tokenizer",
    "build_data_iterator",
    "build_pretrain_datasets",
    "load_tokenizer",
]


def __getattr__(name):
    if name == "build_pretrain_datasets":
        from megatron_bluelm.data.pretrain import build_pretrain_datasets

        return build_pretrain_datasets
    if name in ("build_data_iterator", "DataExhaustedError"):
        from megatron_bluelm.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'megatron_bluelm.data' has no attribute {name!r}")
