"""Data settings: what to train on, how it is tokenized, packed and split."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import yaml

import megatron_bluelm
from megatron_bluelm.config.errors import ConfigError

ASSETS = os.path.join(os.path.dirname(megatron_bluelm.__file__), "assets")
BUNDLED_TOKENIZER = os.path.join(ASSETS, "tokenizer", "bluelm_demo_sp8k.model")
DEMO_PREFIX = "outputs/demo/corpus_text_document"
PREPROCESS_HINT = (
    "run `make data` (or `python -m megatron_bluelm.data.demo`, or tools/preprocess_data.py; "
    "see docs/DATA.md) first"
)


@dataclass
class MixtureSource:
    """One dataset of a blend. Give `weight` (share of all samples) or `epochs` (resample factor)."""

    prefix: str
    name: str = ""
    weight: float | None = None
    epochs: float | None = None
    quality: dict | None = None  # {scores: file.npy, min: 0.2, upsample: [[0.9, 2]]}


@dataclass
class DataConfig:
    prefix: str = DEMO_PREFIX  # an indexed dataset prefix (no .bin/.idx); ignored when `mixture` is set
    mixture: str | list = ""  # a mixture YAML path, or a list of {prefix, weight|epochs, ...}
    tokenizer_model: str = BUNDLED_TOKENIZER  # SentencePiece .model, or a Hugging Face tokenizer.json (or its dir)
    seq_length: int = 4096
    split: str = "969,30,1"  # train,valid,test weights over documents
    reset_position_ids: bool = False  # positions restart after each EOD in a packed row
    reset_attention_mask: bool = False  # no attention across documents; adds attention_mask + document_ids
    eod_mask_loss: bool = False  # no loss on predicting the token after EOD
    mock: bool = False  # synthetic tokens (megatron-core MockGPTDataset): no files needed
    num_workers: int = 0  # DataLoader worker processes
    cache_dir: str = "outputs/cache/data"  # megatron-core sample/shuffle index cache

    def sources(self) -> list[MixtureSource]:
        """The blend: the mixture's sources, or the single `prefix` with weight 1."""
        if not self.mixture:
            return [MixtureSource(prefix=self.prefix, name=os.path.basename(self.prefix), weight=1.0)]
        if isinstance(self.mixture, str):
            return load_mixture_yaml(self.mixture)[0]
        return [_source(s, "data.mixture", i) for i, s in enumerate(self.mixture)]

    def validate(self) -> None:
        if self.seq_length <= 0:
            raise ConfigError(f"data.seq_length: must be > 0, got {self.seq_length}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        _check_split(self.split)
        if not (os.path.isfile(self.tokenizer_model)
                or os.path.isfile(os.path.join(self.tokenizer_model, "tokenizer.json"))):
            raise ConfigError(f"data.tokenizer_model: no such file '{self.tokenizer_model}' (a SentencePiece "
                              f".model, a Hugging Face tokenizer.json, or a directory holding one)")
        if self.mock:
            return
        if isinstance(self.mixture, str) and self.mixture and not os.path.isfile(self.mixture):
            raise ConfigError(f"data.mixture: no such file '{self.mixture}'")
        field_name = "data.mixture" if self.mixture else "data.prefix"
        for src in self.sources():
            check_prefix(src.prefix, field_name)


def check_prefix(prefix: str, field_name: str) -> None:
    if prefix.endswith((".bin", ".idx")):
        raise ConfigError(f"{field_name}: give the prefix without .bin/.idx, e.g. '{prefix[:-4]}'")
    for ext in (".idx", ".bin"):
        if not os.path.isfile(prefix + ext):
            raise ConfigError(f"{field_name}: no such file '{prefix}{ext}' — {PREPROCESS_HINT}")
    if os.path.getsize(prefix + ".bin") == 0:  # megatron-core cannot map an empty file
        raise ConfigError(f"{field_name}: '{prefix}' holds no documents (its .bin is empty); remove it or "
                          f"preprocess non-empty input")


def _check_split(split: str) -> None:
    parts = [p for p in re.split(r"[,/ ]+", split.strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0:
        raise ConfigError(f"data.split: expected three non-negative weights like '969,30,1', got '{split}'")


def _source(raw, where: str, i: int) -> MixtureSource:
    if not isinstance(raw, dict) or "prefix" not in raw:
        raise ConfigError(f"{where}[{i}]: expected a mapping with 'prefix', got {raw!r}")
    unknown = set(raw) - {"prefix", "name", "weight", "epochs", "quality"}
    if unknown:
        raise ConfigError(f"{where}[{i}]: unknown keys {sorted(unknown)}")
    src = MixtureSource(**raw)
    src.name = src.name or os.path.basename(src.prefix)
    if (src.weight is None) == (src.epochs is None):
        raise ConfigError(f"{where}[{i}] ({src.name}): give exactly one of 'weight' or 'epochs'")
    value = src.weight if src.weight is not None else src.epochs
    if not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}[{i}] ({src.name}): weight/epochs must be a number > 0, got {value!r}")
    return src


def load_mixture_yaml(path: str) -> tuple[list[MixtureSource], dict]:
    """Parse a mixture YAML: `sources:` list plus optional top-level settings (e.g. train_tokens)."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"data.mixture: cannot read '{path}': {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"data.mixture: '{path}' is not valid YAML: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list) or not doc["sources"]:
        raise ConfigError(f"data.mixture: '{path}' needs a non-empty 'sources:' list")
    # Paths inside (prefixes, score files) are relative to the working directory, like `prefix`.
    sources = [_source(s, f"{path}: sources", i) for i, s in enumerate(doc["sources"])]
    return sources, {k: v for k, v in doc.items() if k != "sources"}
