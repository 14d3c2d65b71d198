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

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bluelm.data.jsonl import iter_lines, open_input, parse_line
from megatron_bluelm.data.tokenizer import USER_SYMBOLS


def iter_texts(paths: list[str], key: str):
    for path in paths:
        with open_input(path) as f:
            for _, raw in iter_lines(f):
                texts = parse_line(raw, [key]) if isinstance(raw, bytes) else None  # skip bad lines
                if isinstance(texts, list):
                    yield texts[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (.gz/.zst ok)")
    p.add_argument("--json-key", default="text")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="sample cap for training")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)

    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter_texts(args.input, args.json_key),
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
        max_sentence_length=1 << 16,
        num_threads=args.threads,
        minloglevel=1,
    )
    print(f"wrote {args.model_prefix}.model (vocab {args.vocab_size}, {args.model_type})")


if __name__ == "__main__":
    main()
