#!/usr/bin/env python
"""Preprocessing throughput: our pipeline vs. the tokenizer's own limit and common baselines.

Same input (the bundled corpus repeated to --mb megabytes of JSONL) and tokenizer for all rows:
  sp-batched-limit   SentencePiece's batched multithreaded encode of in-memory text, no I/O, no JSON
  ours (...)         megatron_bluelm.data.preprocess (read, parse, encode, write .bin/.idx)
  per-doc loop       one json.loads + encode + IndexedDatasetBuilder.add_document per document
  megatron-lm pool   Pool(workers).imap(encode one doc, chunksize=25), as Megatron-LM's preprocess
Each row runs in a fresh process so its peak RSS is its own (parent + largest child).
  python tools/bench/preprocess_bench.py [--mb 16] [--workers 2]
"""
from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from megatron_bluelm.config.data import BUNDLED_TOKENIZER  # noqa: E402
from megatron_bluelm.data.demo import DOCSTRINGS, PYTHON_DOCS  # noqa: E402


def make_input(path: str, mb: float) -> None:
    lines = []
    for src in (PYTHON_DOCS, DOCSTRINGS):
        with gzip.open(src, "rb") as f:
            lines += f.readlines()
    size, target = 0, int(mb * 1e6)
    with open(path, "wb") as out:
        while size < target:
            for line in lines:
                out.write(line)
                size += len(line)


# ---- variants (each returns docs, tokens) ---------------------------------------------------

def run_limit(path, workers, tok):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok)
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    t0 = time.time()
    tokens = 0
    for i in range(0, len(docs), 512):
        tokens += sum(map(len, sp.Encode(docs[i:i + 512], num_threads=os.cpu_count())))
    return len(docs), tokens, time.time() - t0


def run_ours(path, workers, tok, out):
    from megatron_bluelm.data.preprocess import Options, preprocess

    t0 = time.time()
    s = preprocess(Options(inputs=[path], output_prefix=out, tokenizer_model=tok, append_eod=True,
                           workers=workers, progress=False))
    return s.documents, s.tokens, time.time() - t0


def run_loop(path, workers, tok, out):
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=tok)
    t0 = time.time()
    builder = IndexedDatasetBuilder(out + ".bin", dtype=np.uint16)
    docs = tokens = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids = sp.encode(json.loads(line)["text"]) + [sp.eos_id()]
            builder.add_document(np.array(ids), [len(ids)])
            docs, tokens = docs + 1, tokens + len(ids)
    builder.finalize(out + ".idx")
    return docs, tokens, time.time() - t0


_SP = None


def _pool_init(tok):
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=tok)


def _pool_encode(line):
    ids = _SP.encode(json.loads(line)["text"]) + [_SP.eos_id()]
    return ids, len(line)


def run_pool(path, workers, tok, out):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    t0 = time.time()
    builder = IndexedDatasetBuilder(out + ".bin", dtype=np.uint16)
    docs = tokens = 0
    with open(path, encoding="utf-8") as f, mp.Pool(workers, _pool_init, (tok,)) as pool:
        for ids, _ in pool.imap(_pool_encode, f, chunksize=25):
            builder.add_document(np.array(ids), [len(ids)])
            docs, tokens = docs + 1, tokens + len(ids)
    builder.finalize(out + ".idx")
    return docs, tokens, time.time() - t0


VARIANTS = {
    "sp-batched-limit": (run_limit, False),
    "ours (workers=W)": (run_ours, True),
    "ours (workers=1, threads=all)": (run_ours, True),
    "per-doc loop": (run_loop, True),
    "megatron-lm pool (W, chunk 25)": (run_pool, True),
}


def child(name: str, path: str, workers: int, out: str) -> None:
    fn, writes = VARIANTS[name]
    w = 1 if "workers=1" in name or name == "per-doc loop" else workers
    args = (path, w, BUNDLED_TOKENIZER) + ((out,) if writes else ())
    docs, tokens, secs = fn(*args)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"docs": docs, "tokens": tokens, "secs": secs, "rss_mb": rss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=16.0, help="input size in MB")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.input, a.workers, a.out)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.jsonl")
        make_input(path, a.mb)
        nbytes = os.path.getsize(path)
        print(f"input: {nbytes / 1e6:.1f} MB JSONL, tokenizer {os.path.basename(BUNDLED_TOKENIZER)}, "
              f"{os.cpu_count()} cores, workers W={a.workers}\n")
        print(f"{'variant':<32}{'docs/s':>10}{'MB/s':>8}{'Mtok/s':>8}{'peak RSS MB':>13}{'vs limit':>10}")
        limit = None
        for name in VARIANTS:
            r = subprocess.run([sys.executable, __file__, "--child", name, "--input", path, "--workers",
                                str(a.workers), "--out", os.path.join(tmp, "out")],
                               capture_output=True, text=True, check=True)
            s = json.loads(r.stdout.strip().splitlines()[-1])
            limit = limit or s["secs"]
            label = name.replace("W", str(a.workers)) if "(W" in name or "=W" in name else name
            print(f"{label:<32}{s['docs'] / s['secs']:>10,.0f}{nbytes / 1e6 / s['secs']:>8.1f}"
                  f"{s['tokens'] / 1e6 / s['secs']:>8.2f}{s['rss_mb']:>13,.0f}{s['secs'] / limit:>9.2f}x")


if __name__ == "__main__":
    main()
