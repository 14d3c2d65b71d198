"""Key-data resampling: samples drawn per source equal the configured weights/epochs, exactly."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_bluelm.config.data import DataConfig, MixtureSource
from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data import build_pretrain_datasets, load_tokenizer
from megatron_bluelm.data.mixture import exact_blend_weights, plan_counts, split_evenly
from megatron_bluelm.data.quality import repeat_counts

SEQ = 64
ROOT = Path(__file__).resolve().parents[2]


def _build(mixture, tok, tmp_path, train=3000, seed=5):
    cfg = DataConfig(mixture=mixture, cache_dir=str(tmp_path / "cache"))
    cfg.validate()
    return build_pretrain_datasets(cfg, tok, seq_length=SEQ, num_samples=(train, 60, 4), seed=seed)


def test_epochs_and_weights_drawn_exactly(demo_prefixes, tokenizer_path, tmp_path):
    tok = load_tokenizer(tokenizer_path)
    mixture = [{"name": "key", "prefix": demo_prefixes["python_docs"], "epochs": 3},
               {"name": "bulk", "prefix": demo_prefixes["docstrings"], "weight": 1.0}]
    train, valid, _ = _build(mixture, tok, tmp_path, train=10000)
    key, bulk = train.plan
    assert key.samples == round(3 * key.samples_per_epoch)  # exactly 3 epochs of the key set
    assert key.samples + bulk.samples == 10000 == len(train)
    assert train.source_counts() == [key.samples, bulk.samples]  # megatron-core's own blend index
    again, _, _ = _build(mixture, tok, tmp_path / "again", train=10000)
    assert np.array_equal(np.asarray(again.megatron.dataset_index), np.asarray(train.megatron.dataset_index))
    assert sum(valid.source_counts()) == len(valid) >= 60


def test_weights_only_split_exactly(demo_prefixes, tokenizer_path, tmp_path):
    tok = load_tokenizer(tokenizer_path)
    mixture = [{"prefix": demo_prefixes["python_docs"], "weight": 0.3},
               {"prefix": demo_prefixes["docstrings"], "weight": 0.7}]
    train, _, _ = _build(mixture, tok, tmp_path, train=1001)
    assert train.source_counts() == [300, 701] == [p.samples for p in train.plan]


def test_epochs_only_are_relative_factors():
    src = [MixtureSource("a", epochs=3.0), MixtureSource("b", epochs=0.5)]
    counts = plan_counts(src, [100, 400], 1000)
    assert sum(counts) == 1000 and counts == split_evenly(1000, [300, 200]) == [600, 400]


def test_plan_errors_are_clear():
    src = [MixtureSource("a", name="a", epochs=5), MixtureSource("b", name="b", weight=1)]
    with pytest.raises(ConfigError, match="the `epochs` sources alone need 500"):
        plan_counts(src, [100, 100], 400)
    with pytest.raises(ConfigError, match="less than one sequence"):
        plan_counts(src, [0, 100], 400)


@pytest.mark.parametrize("counts", [[1, 2], [17, 5, 1000], [312, 1641], [3, 3, 3, 3, 1]])
def test_exact_blend_weights_reproduce_counts(counts):
    from megatron.core.datasets import helpers
    from megatron.core.datasets.utils import normalize

    w = normalize(normalize(exact_blend_weights(counts)))
    n = sum(counts)
    index, sample = np.zeros(n, np.int16), np.zeros(n, np.int64)
    helpers.build_blending_indices(index, sample, w, len(counts), n, False)
    assert np.bincount(index, minlength=len(counts)).tolist() == counts


def test_quality_threshold_and_upsampling(demo_prefixes, tokenizer_path, tmp_path):
    tok = load_tokenizer(tokenizer_path)
    prefix = demo_prefixes["python_docs"]
    src_ds = IndexedDataset(prefix)
    n = len(src_ds.document_indices) - 1
    scores = np.linspace(0, 1, n)
    np.save(tmp_path / "scores.npy", scores)
    reps = repeat_counts(scores, 0.25, [[0.9, 3], [0.5, 2]])
    quality = {"scores": str(tmp_path / "scores.npy"), "min": 0.25, "upsample": [[0.9, 3], [0.5, 2]]}
    mixture = [{"name": "q", "prefix": prefix, "weight": 1, "quality": quality},
               {"name": "other", "prefix": demo_prefixes["docstrings"], "weight": 1}]
    train, _, _ = _build(mixture, tok, tmp_path)
    derived = IndexedDataset(train.plan[0].prefix)
    assert len(derived) == reps.sum() and set(reps.tolist()) == {0, 1, 2, 3}
    expected = [src_ds[d].tolist() for d in range(n) for _ in range(reps[d])]
    assert [derived[i].tolist() for i in range(len(derived))] == expected


def test_config_validation_messages(tmp_path, demo_prefixes):
    missing = DataConfig(prefix=str(tmp_path / "x_text_document"))
    with pytest.raises(ConfigError, match=r"data.prefix: no such file '.*x_text_document.idx' — run `make data`"):
        missing.validate()
    with pytest.raises(ConfigError, match="without .bin/.idx"):
        DataConfig(prefix=demo_prefixes["corpus"] + ".idx").validate()
    with pytest.raises(ConfigError, match="data.split"):
        DataConfig(prefix=demo_prefixes["corpus"], split="1,2").validate()
    with pytest.raises(ConfigError, match="data.tokenizer_model: no such file"):
        DataConfig(mock=True, tokenizer_model="nope.model").validate()
    with pytest.raises(ConfigError, match="exactly one of 'weight' or 'epochs'"):
        DataConfig(mixture=[{"prefix": demo_prefixes["corpus"]}]).validate()
    bad = tmp_path / "m.yaml"
    bad.write_text("sources: []\n")
    with pytest.raises(ConfigError, match="needs a non-empty 'sources:' list"):
        DataConfig(mixture=str(bad)).validate()
    DataConfig(prefix=demo_prefixes["corpus"]).validate()
    assert DataConfig().prefix == "outputs/demo/corpus_text_document"


def test_mixture_report_tool(demo_prefixes, tmp_path):
    yaml_path = tmp_path / "mix.yaml"
    yaml_path.write_text(
        "train_tokens: 640000\nseq_length: 64\nsources:\n"
        f"  - {{name: key, prefix: {demo_prefixes['python_docs']}, epochs: 3}}\n"
        f"  - {{name: web, prefix: {demo_prefixes['docstrings']}, weight: 1}}\n"
    )
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "mixture_report.py"), str(yaml_path)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "10,000 samples x 64 tokens" in r.stdout
    key_row = next(line for line in r.stdout.splitlines() if line.startswith("key"))
    assert key_row.split()[-1] == "3.00"
