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


# Names Hugging Face tokenizers commonly give the end-of-document token, tried in order when the
# tokenizer's own config does not say.
_HF_EOD_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


def is_hf_tokenizer(path: str) -> bool:
    """A Hugging Face ``tokenizer.json`` (or a directory holding one) rather than a SentencePiece model."""
    return path.endswith(".json") or (os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")))


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (through the ``tokenizers`` library) with the attributes and
    methods of :class:`Tokenizer`. The project's special tokens (``<think>``, ``<|end|>``, ``<image>``, ...)
    are added, each one id after the tokenizer's own, where the tokenizer lacks them; the EOD is the
    tokenizer's end-of-sequence token (``eos_token`` of a ``tokenizer_config.json`` beside it, else the
    first of ``</s> <|endoftext|> <|end_of_text|> <eos>`` it has), and the keys ``<pad> <unk> <s> </s>``
    of ``special_ids`` name the roles (pad falls back to the EOD; unk and bos may be absent: -1)."""

    def __init__(self, path: str):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTok

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ConfigError(f"tokenizer: no such file '{file}'")
        try:
            self.hf = HFTok.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception with the parser's message
            raise ConfigError(f"tokenizer '{file}' could not be loaded: {e}") from e
        self.model_path = path
        self.hf.no_padding()
        self.hf.no_truncation()
        config = _hf_tokenizer_config(file)
        added = [t for t in USER_SYMBOLS if self.hf.token_to_id(t) is None]
        self.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
        self.added_tokens = added
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        eod_name = _token_name(config.get("eos_token")) or next(
            (t for t in _HF_EOD_NAMES if self.hf.token_to_id(t) is not None), None)
        if eod_name is None or self.hf.token_to_id(eod_name) is None:
            raise ConfigError(f"tokenizer '{file}': no end-of-document token (looked for eos_token in "
                              f"tokenizer_config.json, then {list(_HF_EOD_NAMES)})")
        self.eod = self.eos = self.hf.token_to_id(eod_name)
        pad = self._id(_token_name(config.get("pad_token")))
        self.pad = self.eod if pad < 0 else pad
        self.bos = self._id(_token_name(config.get("bos_token")))
        self.unk = self._id(_token_name(config.get("unk_token")))
        self.special_ids = {t: self.hf.token_to_id(t) for t in USER_SYMBOLS}
        self.special_ids.update({PAD: self.pad, UNK: self.unk, BOS: self.bos, EOD: self.eod})
        with open(file, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        self.unique_identifiers = {"class": "HFTokenizer", "sha256": digest, "added": added}

    def _id(self, name: str | None) -> int:
        i = self.hf.token_to_id(name) if name else None
        return -1 if i is None else i

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Batched encode (the library parallelizes it in Rust; ``num_threads`` is not used)."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        return self.unk if i is None else i

    def id_to_token(self, idx: int) -> str:
        return self.hf.id_to_token(int(idx))


def _hf_tokenizer_config(tokenizer_file: str) -> dict:
    import json

    path = os.path.join(os.path.dirname(os.path.abspath(tokenizer_file)), "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_name(value) -> str | None:
    """``tokenizer_config.json`` writes a special token as a string or as ``{"content": ...}``."""
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(path: str | None = None) -> Tokenizer | HFTokenizer:
    """Load a SentencePiece model, or a Hugging Face ``tokenizer.json`` (file or directory); None means
    the bundled demo tokenizer."""
    path = path or bundled_tokenizer_path()
    return HFTokenizer(path) if is_hf_tokenizer(path) else Tokenizer(path)
