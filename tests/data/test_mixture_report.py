"""tools/mixture_report.py reports what training draws: quality rules applied, empty sources named."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "mixture_report.py")


def _report(path, tmp_path, *extra):
    return subprocess.run([sys.executable, TOOL, str(path), "--cache-dir", str(tmp_path / "cache"), *extra],
                          capture_output=True, text=True, cwd=tmp_path)


def _tokens_column(stdout: str) -> dict[str, int]:
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1].replace(",", "").isdigit():
            rows[parts[0]] = (int(parts[1].replace(",", "")), int(parts[2].replace(",", "")))
    return rows


def test_quality_filter_is_applied_as_in_training(demo_prefixes, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = demo_prefixes["docstrings"]
    ds = IndexedDataset(prefix)
    n = len(ds.document_indices) - 1
    scores = np.linspace(0.0, 1.0, n)  # documents in order: the first ~40% below the threshold
    np.save(tmp_path / "scores.npy", scores)
    sources = [{"name": "docs", "prefix": demo_prefixes["python_docs"], "weight": 0.5},
               {"name": "strings", "prefix": prefix, "weight": 0.5,
                "quality": {"scores": str(tmp_path / "scores.npy"), "min": 0.4}}]
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"train_tokens": 200_000, "seq_length": 128, "sources": sources}))
    r = _report(mix, tmp_path, "--split", "1,0,0")
    assert r.returncode == 0, r.stderr
    rows = _tokens_column(r.stdout)
    kept = int(sum(ds.sequence_lengths[i] for i in range(n) if scores[i] >= 0.4))
    assert rows["strings"][0] == kept < int(ds.sequence_lengths.sum())  # filtered tokens, not the raw count

    # and the same plan training builds (data/pretrain.py), sample for sample
    from megatron_bluelm.config.data import DataConfig
    from megatron_bluelm.data.pretrain import build_megatron_datasets
    from megatron_bluelm.data.tokenizer import load_tokenizer

    cfg = DataConfig(mixture=str(mix), split="1,0,0", cache_dir=str(tmp_path / "cache"), seq_length=128)
    samples = 200_000 // 128
    _, plan = build_megatron_datasets(cfg, load_tokenizer(cfg.tokenizer_model), seq_length=128,
                                      num_samples=(samples, 0, 0), seed=1)
    assert {p.name: (p.tokens, p.samples) for p in plan} == rows | {} and set(rows) == {"docs", "strings"}


def test_a_zero_document_source_is_named(demo_prefixes, tmp_path):
    from megatron_bluelm.data.indexed_writer import IndexedWriter

    empty = str(tmp_path / "empty_text_document")
    IndexedWriter(empty, np.uint16).finalize()
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"train_tokens": 100_000, "seq_length": 128, "sources": [
        {"prefix": demo_prefixes["python_docs"], "weight": 0.9}, {"prefix": empty, "weight": 0.1}]}))
    r = _report(mix, tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"error: data.mixture: '{empty}' holds no documents (its .bin is empty); "
                                f"remove it or preprocess non-empty input")
