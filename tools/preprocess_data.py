#!/usr/bin/env python
"""Tokenize JSONL into megatron-core indexed datasets (PREFIX_text_document.bin/.idx).

SFT conversations (tokens + assistant-only loss mask, thinking / non-thinking mix): add --chat,
see `python tools/preprocess_data.py --chat --help` and docs/SFT_AND_GENERATION.md.
Image-text records ({"images": [...], "text" | "messages": ...}): add --multimodal, see docs/MULTIMODAL.md.

Demo (bundled corpus and tokenizer):
  python tools/preprocess_data.py \
      --input megatron_bluelm/assets/corpus/python_docs.jsonl.gz \
      --output-prefix outputs/demo/corpus \
      --tokenizer-model megatron_bluelm/assets/tokenizer/bluelm_demo_sp8k.model \
      --append-eod --workers 2
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.preprocess import CHUNK_BYTES, Options, preprocess


def parse_args(argv=None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL file(s), one document per line (.gz / .zst ok); all go to one output")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_<key>_document.bin/.idx")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="one output dataset per key")
    p.add_argument("--append-eod", action="store_true", help="end every document with </s>")
    p.add_argument("--split-sentences", action="store_true", help="one sequence per sentence")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--threads", type=int, default=0, help="SentencePiece threads each (0: auto)")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="bad line policy: stop with file:line (default) or skip and count it")
    p.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES, help="lines per batched encode")
    p.add_argument("--max-line-bytes", type=int, default=64 << 20)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    return Options(
        inputs=a.input, output_prefix=a.output_prefix, tokenizer_model=a.tokenizer_model,
        json_keys=a.json_keys, append_eod=a.append_eod, split_sentences=a.split_sentences,
        workers=a.workers, threads=a.threads, on_error=a.on_error, chunk_bytes=a.chunk_bytes,
        max_line_bytes=a.max_line_bytes, progress=not a.no_progress,
    )


def _terminate(signum, frame):
    # SIGTERM (a scheduler's cancel, `kill`) unwinds like Ctrl-C: the writers' abort removes the temporaries.
    raise KeyboardInterrupt


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if "--chat" in argv:  # SFT conversations: tokens + loss mask (megatron_bluelm/data/sft.py)
        from megatron_bluelm.data.sft import chat_main

        return chat_main(argv)
    if "--multimodal" in argv:  # image-text records: tokens + loss mask + image bytes (data/multimodal.py)
        from megatron_bluelm.data.multimodal import multimodal_main

        return multimodal_main(argv)
    opts = parse_args(argv)
    try:
        summary = preprocess(opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written (temporary files removed)", file=sys.stderr)
        return 130
    except OSError as e:  # writing or reading outside the checked paths, e.g. a disk that filled up
        print(f"error: {e.filename or opts.output_prefix}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
