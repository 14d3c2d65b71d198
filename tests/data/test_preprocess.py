"""Round trip: the .bin holds exactly SentencePiece's own encoding of every document (+EOD)."""
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from jsonl_files import read_docs, write_jsonl
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_bluelm.data.demo import DOCSTRINGS, PYTHON_DOCS
from megatron_bluelm.data.preprocess import Options, preprocess, split_sentences


def _opts(inputs, prefix, tok, **kw):
    return Options(inputs=inputs, output_prefix=str(prefix), tokenizer_model=tok, progress=False, **kw)


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_token_exact(tmp_path, tokenizer_path, sp, workers):
    docs = read_docs(PYTHON_DOCS) + read_docs(DOCSTRINGS)
    # small chunks: many batches, so ordering across workers is exercised
    s = preprocess(_opts([PYTHON_DOCS, DOCSTRINGS], tmp_path / "c", tokenizer_path,
                         append_eod=True, workers=workers, chunk_bytes=64 << 10))
    ds = IndexedDataset(s.outputs[0])
    expected = sp.encode(docs)
    assert len(ds) == len(docs) == s.documents == s.sequences
    assert s.tokens == sum(len(e) + 1 for e in expected) == int(ds.sequence_lengths.sum())
    for i, e in enumerate(expected):
        assert ds[i].tolist() == e + [sp.eos_id()], i
    assert ds[0].dtype == np.uint16
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))


def test_plain_zstd_and_no_eod(tmp_path, tokenizer_path, sp):
    zstd = pytest.importorskip("zstandard")
    docs = read_docs(PYTHON_DOCS)[:50]
    with open(PYTHON_DOCS, "rb") as f:
        raw = gzip.decompress(f.read())
    raw = b"".join(raw.splitlines(keepends=True)[:50])
    plain = tmp_path / "d.jsonl"
    plain.write_bytes(raw)
    (tmp_path / "d.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(raw))
    for name in ("d.jsonl", "d.jsonl.zst"):
        s = preprocess(_opts([str(tmp_path / name)], tmp_path / name, tokenizer_path))
        ds = IndexedDataset(s.outputs[0])
        assert [ds[i].tolist() for i in range(len(ds))] == sp.encode(docs)


def test_split_sentences_and_multiple_keys(tmp_path, tokenizer_path, sp):
    rows = [{"text": "First one. Second one! Third?", "title": "A title."},
            {"text": "Only sentence here", "title": "Another. Two."}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    s = preprocess(_opts([path], tmp_path / "o", tokenizer_path, json_keys=["text", "title"],
                         split_sentences=True, append_eod=True))
    assert s.outputs == [str(tmp_path / "o_text_sentence"), str(tmp_path / "o_title_sentence")]
    for key, prefix in zip(["text", "title"], s.outputs):
        ds = IndexedDataset(prefix)
        sents = [split_sentences(r[key]) for r in rows]
        flat = [sp.encode(x) for ss in sents for x in ss]
        ends = np.cumsum([len(ss) for ss in sents]) - 1
        for i in ends:
            flat[i] = flat[i] + [sp.eos_id()]
        assert [ds[i].tolist() for i in range(len(ds))] == flat
        assert ds.document_indices.tolist() == [0, *np.cumsum([len(ss) for ss in sents]).tolist()]
    assert split_sentences("First one. Second one! Third?") == ["First one.", "Second one!", "Third?"]


def test_rerun_replaces_output_atomically(tmp_path, tokenizer_path, sp):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha"}] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "beta gamma"}])
    preprocess(_opts([a], tmp_path / "o", tokenizer_path))
    s = preprocess(_opts([b], tmp_path / "o", tokenizer_path))
    ds = IndexedDataset(s.outputs[0])
    assert len(ds) == 1 and ds[0].tolist() == sp.encode("beta gamma")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_demo_command_line(tmp_path, tokenizer_path):
    import subprocess
    import sys

    out = tmp_path / "demo" / "corpus"
    shutil.copy(PYTHON_DOCS, tmp_path / "in.jsonl.gz")
    tool = str(Path(__file__).resolve().parents[2] / "tools" / "preprocess_data.py")
    r = subprocess.run([sys.executable, tool, "--input", str(tmp_path / "in.jsonl.gz"),
                        "--output-prefix", str(out), "--tokenizer-model", tokenizer_path,
                        "--append-eod", "--workers", "2"], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "documents: 246" in r.stdout and "skipped lines: 0" in r.stdout
    assert "docs/s" in r.stderr and "MB/s" in r.stderr  # tqdm progress bar
    assert IndexedDataset(str(out) + "_text_document").sequence_lengths.shape == (246,)
