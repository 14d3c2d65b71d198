#!/usr/bin/env python
"""Train a SentencePiece model on JSONL text, with the project's special tokens built in.

Example (the bundled tokenizer was made with exactly this):
  python tools/train_tokenizer.py \
      --input megatron_bluelm/assets/corpus/python_docs.jsonl.gz \
              megatron_bluelm/assets/corpus/stdlib_docstrings.jsonl.gz \
      --model-prefix megatron_bluelm/assets/tokenizer/bluelm_demo_sp8k --vocab-size 8192
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.jsonl import BadLine, iter_lines, open_input, parse_line
from megatron_bluelm.data.tokenizer import USER_SYMBOLS

# SentencePiece's trainer drops every sentence longer than its max_sentence_length (bytes) without a
# word; documents are split below it at line breaks instead, so no text is lost.
MAX_SENTENCE_BYTES = 1 << 16


@dataclass
class TextStats:
    documents: int = 0
    split_documents: int = 0  # longer than the limit: split into pieces
    pieces: int = 0  # strings handed to the trainer
    skipped: Counter = field(default_factory=Counter)
    example: str = ""  # the first skipped line, file:line: why

    def format(self) -> str:
        out = [f"documents: {self.documents:,} ({self.pieces:,} training strings)"]
        if self.split_documents:
            out.append(f"  {self.split_documents:,} documents over {MAX_SENTENCE_BYTES // 1024} KiB were split at "
                       f"line breaks (SentencePiece would skip them whole)")
        if self.skipped:
            kinds = ", ".join(f"{n:,} x {k}" for k, n in self.skipped.most_common())
            out.append(f"skipped lines: {sum(self.skipped.values()):,} ({kinds}); e.g. {self.example}")
        return "\n".join(out)


def split_long(text: str, max_bytes: int = MAX_SENTENCE_BYTES) -> list[str]:
    """Pieces of ``text`` of at most ``max_bytes`` UTF-8 bytes each, cut after a line break where one
    is near, else at a character boundary; their concatenation is ``text``."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return [text]
    pieces, start = [], 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        while end > start and (data[end] & 0xC0) == 0x80:  # not inside a multi-byte character
            end -= 1
        newline = data.rfind(b"\n", start, end)
        if newline >= start + max_bytes // 2:
            end = newline + 1
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    pieces.append(data[start:].decode("utf-8"))
    return pieces


def iter_texts(paths: list[str], key: str, stats: TextStats | None = None, max_bytes: int = MAX_SENTENCE_BYTES):
    """Training strings of the JSONL files: documents (split when long); bad lines counted in ``stats``."""
    stats = stats if stats is not None else TextStats()
    for path in paths:
        with open_input(path) as f:
            for lineno, raw in iter_lines(f):
                texts = parse_line(raw, [key], lineno) if isinstance(raw, bytes) else raw
                if isinstance(texts, BadLine):
                    stats.skipped[texts.kind] += 1
                    stats.example = stats.example or f"{path}:{lineno}: {texts.message()}"
                    continue
                pieces = split_long(texts[0], max_bytes)
                stats.documents += 1
                stats.split_documents += len(pieces) > 1
                stats.pieces += len(pieces)
                yield from pieces


def check_inputs(paths: list[str]) -> None:
    for path in paths:
        if os.path.isdir(path):
            raise ConfigError(f"--input: '{path}' is a directory; give the JSONL files in it (e.g. {path}/*.jsonl)")
        if not os.path.isfile(path):
            raise ConfigError(f"--input: no such file '{path}'")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (.gz/.zst ok)")
    p.add_argument("--json-key", default="text")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="sample cap for training")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-progress", action="store_true", help="no progress bar while the corpus is read")
    args = p.parse_args(argv)
    try:
        return train(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(args) -> int:
    import sentencepiece as spm

    check_inputs(args.input)
    if args.threads < 1 or args.vocab_size < 1 or args.max_sentences < 1:
        raise ConfigError("--threads / --vocab-size / --max-sentences: must be >= 1")
    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    stats, failed = TextStats(), []

    def texts():
        bar = None if args.no_progress else _progress_bar()
        try:
            for text in iter_texts(args.input, args.json_key, stats):
                if bar is not None:
                    bar.update(1)
                yield text
        except ConfigError as e:  # SentencePiece wraps it in its own error: keep it to report as is
            failed.append(e)
            raise
        finally:
            if bar is not None:
                bar.close()
        # SentencePiece reads everything first, then trains in C++ without output
        print(f"read {stats.documents:,} documents; training the {args.model_type} model "
              f"(vocab {args.vocab_size}) ...", file=sys.stderr, flush=True)

    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=texts(),
            model_prefix=args.model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            # Fixed ids so every model agrees: <pad>=0 <unk>=1 <s>=2 </s>=3 (eod).
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            # user_defined_symbols are matched before segmentation: one id each, never split.
            user_defined_symbols=USER_SYMBOLS,
            byte_fallback=True,  # unseen characters become byte tokens, never <unk>
            character_coverage=0.9995,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,  # keep code indentation and newlines round-trippable
            normalization_rule_name="identity",
            input_sentence_size=args.max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=args.threads,
            minloglevel=1,
        )
    except (RuntimeError, ConfigError) as e:  # SentencePiece's own checks, e.g. a vocabulary too large
        if failed:
            raise failed[0] from None
        if not stats.documents:
            raise ConfigError(f"--input: no documents in {', '.join(args.input)}\n{stats.format()}") from None
        raise ConfigError(f"SentencePiece could not train: {str(e).strip()}") from None
    print(stats.format())
    print(f"wrote {args.model_prefix}.model (vocab {args.vocab_size}, {args.model_type})")
    return 0


def _progress_bar():
    from tqdm import tqdm

    return tqdm(unit=" strings", unit_scale=True, desc="reading", mininterval=0.5, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
