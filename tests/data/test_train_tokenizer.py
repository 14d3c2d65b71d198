"""tools/train_tokenizer.py: no document silently dropped (long ones are split, bad lines counted), bad
input is a file:line error with exit status 2."""
import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = str(REPO / "tools" / "train_tokenizer.py")
sys.path.insert(0, str(REPO))
from tools.train_tokenizer import MAX_SENTENCE_BYTES, split_long  # noqa: E402


def _train(tmp_path, *inputs, vocab=400):
    return subprocess.run([sys.executable, TOOL, "--input", *map(str, inputs), "--model-prefix",
                           str(tmp_path / "tok" / "t"), "--vocab-size", str(vocab), "--threads", "1"],
                          capture_output=True, text=True, cwd=tmp_path)


def _corpus(path, long_doc):
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog alpha beta gamma delta".split()
    with open(path, "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30))}) + "\n")
        f.write(json.dumps({"text": long_doc}) + "\n")
        f.write("{not json\n")
    return path


def test_documents_over_64k_are_learned_not_skipped(tmp_path):
    import sentencepiece as spm

    long_doc = "\n".join("zqxjv " * 12 for _ in range(2000))  # ~146 KB: the only place 'zqxjv' occurs
    assert len(long_doc.encode()) > MAX_SENTENCE_BYTES
    r = _train(tmp_path, _corpus(tmp_path / "c.jsonl", long_doc))
    assert r.returncode == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "t.model"))
    assert sp.encode("zqxjv", out_type=str) == ["▁zqxjv"]
    assert "1 documents over 64 KiB were split" in r.stdout
    assert "skipped lines: 1 (1 x malformed JSON); e.g." in r.stdout and "c.jsonl:302:" in r.stdout
    assert "reading" in r.stderr and "read 301 documents; training the bpe model (vocab 400)" in r.stderr


@pytest.mark.parametrize("text", ["a" * 200_000, "é" * 70_000 + "\n" + "b" * 10, ("line\n" * 30_000)],
                         ids=["no-breaks", "multibyte", "many-lines"])
def test_split_long_keeps_every_byte_under_the_limit(text):
    pieces = split_long(text)
    assert "".join(pieces) == text
    assert all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in pieces) and len(pieces) > 1


def test_truncated_gzip_is_a_file_line_error(tmp_path):
    data = gzip.compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(20000)))
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    r = _train(tmp_path, path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {path}:"), r.stderr
    assert "cannot read the gzip data" in r.stderr and "Traceback" not in r.stderr


def test_no_documents_and_directories_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    r = _train(tmp_path, tmp_path / "empty.jsonl")
    assert r.returncode == 2 and "error: --input: no documents in" in r.stderr, r.stderr
    r = _train(tmp_path, tmp_path)
    assert r.returncode == 2 and "is a directory" in r.stderr
