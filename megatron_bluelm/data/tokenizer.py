"""SentencePiece tokenizer wrapper with the project's special tokens.

The special tokens are defined once here: the chat template and the image splicer look their ids
up by name through `Tokenizer.special_ids`, so adding one means retraining the tokenizer model.
"""
from __future__ import annotations

import hashlib
import os

import sentencepiece as spm

from megatron_bluelm.config.data import BUNDLED_TOKENIZER
from megatron_bluelm.config.errors import ConfigError

# Control tokens: fixed ids 0..3 in every model trained by tools/train_tokenizer.py.
PAD, UNK, BOS, EOD = "<pad>", "<unk>", "<s>", "</s>"
# User-defined symbols: always one id each, never split by the encoder, even inside text.
USER_SYMBOLS = [
    "<think>", "</think>",
    "<image>", "<img_start>", "<img_end>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>",
]
SPECIAL_TOKENS = [PAD, UNK, BOS, EOD, *USER_SYMBOLS]


def bundled_tokenizer_path() -> str:
    """The tiny tokenizer shipped with the package (trained on the bundled demo corpus)."""
    return BUNDLED_TOKENIZER


class Tokenizer:
    """Thin SentencePiece wrapper with the attributes megatron-core's GPTDataset expects."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise ConfigError(f"tokenizer model: no such file '{model_path}'")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with a terse text
            raise ConfigError(f"tokenizer model '{model_path}' could not be loaded: {e}") from e
        self.vocab_size = self.sp.GetPieceSize()
        self.special_ids = {t: self.sp.PieceToId(t) for t in SPECIAL_TOKENS}
        self._check_specials()
        self.pad = self.special_ids[PAD]
        self.unk = self.special_ids[UNK]
        self.bos = self.special_ids[BOS]
        self.eod = self.special_ids[EOD]
        self.eos = self.eod
        with open(model_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        # megatron-core hashes this into its dataset-index cache keys.
        self.unique_identifiers = {"class": "SentencePieceTokenizer", "sha256": digest}

    def _check_specials(self) -> None:
        # PieceToId returns unk for unknown pieces, so a missing special shows up as a duplicate id.
        missing = [t for t, i in self.special_ids.items() if t != UNK and i == self.sp.unk_id()]
        if missing:
            raise ConfigError(
                f"tokenizer model '{self.model_path}' lacks special tokens {missing}; "
                "train it with tools/train_tokenizer.py"
            )

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Batched encode; SentencePiece releases the GIL and splits the batch over threads."""
        return self.sp.Encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(list(map(int, ids)))

    def token_to_id(self, token: str) -> int:
        return self.sp.PieceToId(token)

    def id_to_token(self, idx: int) -> str:
        return self.sp.IdToPiece(int(idx))


def load_tokenizer(path: str | None = None) -> Tokenizer:
    """Load a SentencePiece model; None means the bundled demo tokenizer."""
    return Tokenizer(path or bundled_tokenizer_path())
