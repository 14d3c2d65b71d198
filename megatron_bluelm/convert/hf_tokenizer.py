"""Our SentencePiece model as a Hugging Face fast tokenizer that encodes to the same ids.

The tokenizer is BPE with byte fallback and SentencePiece's "dummy prefix" (a ``▁`` before the whole
text, not after each special token). HF's stock Llama conversion gets two cases wrong: text that starts
with a space (Metaspace skips its prefix when the text already starts with ``▁``) and text that starts
with a special token (no prefix at all). We instead normalize the *whole* text once — the special tokens
are ``normalized`` added tokens, so splitting on them happens after normalization — and prepend ``▁``
at the start of the text (``\\A``, not every line), except when the text is exactly one special token:
that exception is what keeps the special tokens' own (normalized) spelling unchanged.

``<think>`` / ``</think>`` are added tokens but *not* special: ``decode(..., skip_special_tokens=True)``
(what ``pipeline`` does) keeps the reasoning boundary, while the role, image and end markers are dropped.
Padding is ``<|end|>`` on the left (batched generation continues every row at its end), with no BOS,
and config.json / generation_config.json carry the same ids (convert/llama.py).

Known, documented differences from ``sentencepiece`` (tests/checkpoint/test_hf.py checks the rest):
* a text that is exactly one special token encodes to that token alone (SentencePiece adds ``▁``);
* the control tokens ``<s> </s> <pad> <unk>`` typed as text are spelled out by both (they are not
  registered as HF special tokens for that reason; ``eos``/``pad`` are ``<|end|>``).
"""
from __future__ import annotations

import re

from sentencepiece import sentencepiece_model_pb2

from megatron_bluelm.data.chat_template import CHAT_TEMPLATE
from megatron_bluelm.data.tokenizer import USER_SYMBOLS

SPIECE = "\u2581"
# Kept by skip_special_tokens: they delimit the reasoning inside the answer text.
VISIBLE_SYMBOLS = ("<think>", "</think>")
EOS = PAD = "<|end|>"
# The class name written to tokenizer_config.json: transformers 5 would write its own backend's name
# ("TokenizersBackend"), which transformers 4.x cannot load; this one every supported version loads.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def _proto(model_path: str) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def build_hf_tokenizer(model_path: str):
    """A ``PreTrainedTokenizerFast`` equivalent to our SentencePiece model, chat template included."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    proto = _proto(model_path)
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(f"'{model_path}': only BPE SentencePiece models are supported")
    if proto.normalizer_spec.name != "identity" or not proto.normalizer_spec.add_dummy_prefix:
        raise ValueError(f"'{model_path}': expected the identity normalizer with a dummy prefix")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab, {p.piece: p.score for p in proto.pieces})
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                        byte_fallback=proto.trainer_spec.byte_fallback))
    only_special = "|".join(re.escape(t) for t in USER_SYMBOLS)
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex(rf"\A(?!(?:{only_special})\z)"), SPIECE),  # the dummy prefix, once
        normalizers.Replace(" ", SPIECE),
    ])
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    # One call in id order (each symbol's id is fixed by the SentencePiece model). The `special` flag is
    # what skip_special_tokens reads (the tokenizers library decodes).
    tok.add_tokens([AddedToken(t, special=t not in VISIBLE_SYMBOLS, normalized=True) for t in USER_SYMBOLS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="left",
                                 chat_template=CHAT_TEMPLATE, add_bos_token=False, add_eos_token=False,
                                 clean_up_tokenization_spaces=False, model_max_length=1 << 30)
    return hf


def build_from_tokenizer_json(path: str):
    """A ``PreTrainedTokenizerFast`` from a Hugging Face ``tokenizer.json`` the run trained with (our
    special tokens added as training saw them: ``data/tokenizer.py:HFTokenizer``), chat template included."""
    from transformers import PreTrainedTokenizerFast

    from megatron_bluelm.data.tokenizer import HFTokenizer

    tok = HFTokenizer(path)
    return PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token=EOS, pad_token=PAD, padding_side="left",
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
                                   model_max_length=1 << 30)


def save_hf_tokenizer(model_path: str, out: str) -> None:
    """Write tokenizer.json / tokenizer_config.json loadable by every supported transformers version,
    from our SentencePiece model or from the Hugging Face tokenizer.json the run used."""
    import json
    import os

    from megatron_bluelm.data.tokenizer import is_hf_tokenizer

    (build_from_tokenizer_json(model_path) if is_hf_tokenizer(model_path) else
     build_hf_tokenizer(model_path)).save_pretrained(out)
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = TOKENIZER_CLASS
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
