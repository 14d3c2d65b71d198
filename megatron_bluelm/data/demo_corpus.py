"""Build the bundled demo corpus from English text that ships with CPython itself.

Two sources, both under the PSF licence (see megatron_bluelm/assets/README.md):
  * python_docs: the Python Language Reference topics (`pydoc_data.topics`), split into
    paragraph groups of ~2 KB per document;
  * stdlib_docstrings: module/class/function docstrings of the pure-Python standard library,
    read with `ast` (nothing is imported), one document per module chunk.
The generated files are committed; this module only documents and reproduces how.
Run: python -m megatron_bluelm.data.demo_corpus OUT_DIR
"""
from __future__ import annotations

import ast
import gzip
import json
import os
import sys
import sysconfig

DOC_CHARS = 2000
DOCSTRING_BUDGET = 1_600_000  # characters; keeps the shipped .jsonl.gz well under 1 MB
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__"}


def _group_paragraphs(text: str, size: int = DOC_CHARS) -> list[str]:
    docs, cur = [], []
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        cur.append(para)
        if sum(map(len, cur)) >= size:
            docs.append("\n\n".join(cur))
            cur = []
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def python_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [d for name in sorted(topics) for d in _group_paragraphs(topics[name])]


def _module_docstrings(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
    parts = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(p for p in parts if p and len(p) > 40)


def stdlib_docstrings(budget: int = DOCSTRING_BUDGET) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    docs, used = [], 0
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(f for f in filenames if f.endswith(".py")):
            for doc in _group_paragraphs(_module_docstrings(os.path.join(dirpath, name))):
                if used + len(doc) > budget:
                    return docs
                docs.append(doc)
                used += len(doc)
    return docs


def write_jsonl_gz(path: str, docs: list[str]) -> None:
    # mtime=0 keeps the gzip bytes reproducible.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for d in docs:
            f.write((json.dumps({"text": d}, ensure_ascii=False) + "\n").encode("utf-8"))


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, docs in (("python_docs", python_docs()), ("stdlib_docstrings", stdlib_docstrings())):
        write_jsonl_gz(os.path.join(out_dir, f"{name}.jsonl.gz"), docs)
        print(f"{name}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M characters")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "megatron_bluelm/assets/corpus")
