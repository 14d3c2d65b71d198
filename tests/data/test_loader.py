"""Packed loading: determinism, DP split semantics, exact resume, per-document masks/positions."""
import pytest
import torch

from megatron_bluelm.config.data import DataConfig
from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data import (
    DataExhaustedError,
    build_data_iterator,
    build_pretrain_datasets,
    load_tokenizer,
)

SEQ = 64


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return load_tokenizer(tokenizer_path)


def _datasets(prefix, tok, tmp_path, seed=1234, **kw):
    cfg = DataConfig(prefix=prefix, cache_dir=str(tmp_path / "cache"), **kw)
    cfg.validate()
    return build_pretrain_datasets(cfg, tok, seq_length=SEQ, num_samples=(400, 40, 8), seed=seed)


def _take(ds, n, mbs=4, consumed=0, rank=0, size=1):
    it = build_data_iterator(ds, micro_batch_size=mbs, consumed_samples=consumed, dp_rank=rank, dp_size=size)
    return [next(it) for _ in range(n)]


def test_batch_keys_shapes_and_splits(demo_prefixes, tok, tmp_path):
    train, valid, test = _datasets(demo_prefixes["corpus"], tok, tmp_path)
    assert len(train) >= 400 and len(valid) >= 40 and len(test) >= 8
    b = _take(train, 1)[0]
    assert set(b) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert b["tokens"].shape == (4, SEQ) and b["tokens"].dtype == torch.long
    assert b["loss_mask"].dtype == torch.float32
    assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])  # labels are the next token
    assert torch.equal(b["position_ids"][0], torch.arange(SEQ))


def test_empty_split_is_none_not_a_hang(demo_prefixes, tok, tmp_path):
    # 246 documents * 0.1% rounds to no test document: that split is None, the others unchanged
    train, valid, test = _datasets(demo_prefixes["python_docs"], tok, tmp_path)
    assert test is None and len(train) >= 400 and len(valid) >= 40
    with pytest.raises(ConfigError, match="no dataset for this split"):
        build_data_iterator(test, micro_batch_size=1, consumed_samples=0, dp_rank=0, dp_size=1)


def test_deterministic_by_seed_and_cache(demo_prefixes, tok, tmp_path):
    a = _take(_datasets(demo_prefixes["corpus"], tok, tmp_path)[0], 3)
    b = _take(_datasets(demo_prefixes["corpus"], tok, tmp_path)[0], 3)  # cache hit path
    c = _take(_datasets(demo_prefixes["corpus"], tok, tmp_path / "other", seed=7)[0], 3)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def test_dp_ranks_union_equals_single_rank_stream(demo_prefixes, tok, tmp_path):
    train = _datasets(demo_prefixes["corpus"], tok, tmp_path)[0]
    mbs, dp, steps, start = 2, 4, 3, 10
    single = torch.cat([b["tokens"] for b in _take(train, steps * dp, mbs=mbs, consumed=start)])
    per_rank = [_take(train, steps, mbs=mbs, consumed=start, rank=r, size=dp) for r in range(dp)]
    # global step s = concatenation over ranks of rank r's s-th micro-batch
    union = torch.cat([per_rank[r][s]["tokens"] for s in range(steps) for r in range(dp)])
    assert torch.equal(single, union)
    assert torch.equal(single[0], train[start]["tokens"])  # stream = dataset order from consumed


def test_resume_from_consumed_samples_equals_continuing(demo_prefixes, tok, tmp_path):
    train = _datasets(demo_prefixes["corpus"], tok, tmp_path)[0]
    full = _take(train, 6, mbs=3, size=2, rank=1)
    resumed = _take(train, 2, mbs=3, size=2, rank=1, consumed=4 * 3 * 2)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(full[4:], resumed))


def test_exhaustion_raises_clear_error(demo_prefixes, tok, tmp_path):
    train = _datasets(demo_prefixes["corpus"], tok, tmp_path)[0]
    it = build_data_iterator(train, micro_batch_size=4, consumed_samples=len(train) - 6, dp_rank=0, dp_size=1)
    next(it)
    with pytest.raises(DataExhaustedError, match="dataset exhausted"):
        next(it)


def test_reset_position_ids_and_attention_mask_on_packed_row(demo_prefixes, tok, tmp_path):
    train = _datasets(demo_prefixes["corpus"], tok, tmp_path, reset_position_ids=True,
                      reset_attention_mask=True, eod_mask_loss=True)[0]
    # find a packed row holding a document boundary
    row = next(train[i] for i in range(len(train)) if (train[i]["tokens"][:-1] == tok.eod).any())
    tokens, pos, docs = row["tokens"], row["position_ids"], row["document_ids"]
    assert "attention_mask" not in row  # no dense [s, s] mask: the ids are all the attention needs
    eods = (tokens == tok.eod).nonzero().flatten().tolist()
    starts = [0] + [e + 1 for e in eods if e + 1 < SEQ]
    expected_docs = torch.zeros(SEQ, dtype=torch.long)
    for d, s in enumerate(starts[1:], 1):
        expected_docs[s:] = d
    assert torch.equal(docs, expected_docs)
    for s in starts:  # positions restart at every document start
        assert pos[s] == 0
    assert torch.equal(pos[1:][docs[1:] == docs[:-1]], pos[:-1][docs[1:] == docs[:-1]] + 1)
    assert (row["loss_mask"][tokens == tok.eod] == 0).all()
    b = _take(train, 1)[0]
    assert "attention_mask" not in b and b["document_ids"].shape == (4, SEQ)


def test_mock_needs_no_files(tok, tmp_path):
    cfg = DataConfig(prefix=str(tmp_path / "nothing"), mock=True)
    cfg.validate()
    train, _, _ = build_pretrain_datasets(cfg, tok, seq_length=SEQ, num_samples=(16, 4, 4), seed=0)
    b = _take(train, 1)[0]
    assert b["tokens"].shape == (4, SEQ) and int(b["tokens"].max()) < tok.vocab_size


def test_dataloader_workers_give_the_same_batches(demo_prefixes, tok, tmp_path):
    train = _datasets(demo_prefixes["corpus"], tok, tmp_path)[0]
    a = _take(train, 3)
    it = build_data_iterator(train, micro_batch_size=4, consumed_samples=0, dp_rank=0, dp_size=1, num_workers=2)
    b = [next(it) for _ in range(3)]
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))


def test_index_build_is_announced_and_timed(tok, tmp_path, capsys):
    """megatron-core's index build is silent and can take tens of seconds: the loader says so."""
    cfg = DataConfig(prefix=str(tmp_path / "nothing"), mock=True)
    build_pretrain_datasets(cfg, tok, seq_length=SEQ, num_samples=(16, 4, 4), seed=0)
    out = capsys.readouterr().out
    assert "data: building dataset indices for 16, 4, 4 train/valid/test samples" in out
    assert "data: dataset indices ready in" in out
