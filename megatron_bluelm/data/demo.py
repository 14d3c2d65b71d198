"""Preprocess the bundled demo corpus (what `make data` runs).

Writes, under outputs/demo/ (relative to the working directory):
  corpus_text_document       both bundled files  (DataConfig's default prefix)
  python_docs_text_document  the Python reference topics   (examples/mixture_demo.yaml)
  docstrings_text_document   the stdlib docstrings         (examples/mixture_demo.yaml)
Run: python -m megatron_bluelm.data.demo [OUT_DIR]
"""
from __future__ import annotations

import os
import sys

from megatron_bluelm.config.data import ASSETS, BUNDLED_TOKENIZER
from megatron_bluelm.data.preprocess import Options, preprocess

CORPUS = os.path.join(ASSETS, "corpus")
PYTHON_DOCS = os.path.join(CORPUS, "python_docs.jsonl.gz")
DOCSTRINGS = os.path.join(CORPUS, "stdlib_docstrings.jsonl.gz")


def prepare(out_dir: str = "outputs/demo", workers: int = 2) -> None:
    jobs = {"corpus": [PYTHON_DOCS, DOCSTRINGS], "python_docs": [PYTHON_DOCS], "docstrings": [DOCSTRINGS]}
    for name, inputs in jobs.items():
        summary = preprocess(Options(
            inputs=inputs, output_prefix=os.path.join(out_dir, name), tokenizer_model=BUNDLED_TOKENIZER,
            append_eod=True, workers=workers, progress=False,
        ))
        print(f"{name}: {summary.documents:,} documents, {summary.tokens:,} tokens -> {summary.outputs[0]}")


if __name__ == "__main__":
    prepare(*sys.argv[1:2])
