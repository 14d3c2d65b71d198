"""Per-document attention of packed rows: the same losses and gradients as the documents alone, no
attention across documents, the compact mask structures (FlexAttention block masks, their cache)."""
import warnings

import pytest
import torch
from distributed import run_distributed
from packed_workers import SEQ, alone_batch, documents, packed_batch

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


# ---------------------------------------------------------------------------- block masks (CPU)

def _ids(b, s, p, seed):
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.rand(b, s, generator=gen) < p
    cuts[:, 0] = False
    return cuts.long().cumsum(-1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("p", [0.002, 0.02, 0.2])  # documents longer than, about, shorter than a block
def test_sorted_block_mask_equals_create_block_mask(causal, p):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from bluelm_kernels.attention import _mask_mod, attention_ref, sorted_document_block_mask

    ids = _ids(2, 512, p, seed=int(p * 1000))
    ours = sorted_document_block_mask(ids, causal, 128)
    ref = create_block_mask(_mask_mod(ids, causal), 2, None, 512, 512, device="cpu")
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)  # same skipped / full blocks
    q, k, v = torch.randn(2, 4, 512, 16), torch.randn(2, 2, 512, 16), torch.randn(2, 2, 512, 16)
    out = flex_attention(q, k, v, block_mask=ours, enable_gqa=True)
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=causal, document_ids=ids))


def test_block_mask_cache_is_per_micro_batch():
    from bluelm_kernels.attention import cached_document_block_mask

    ids = _ids(1, 256, 0.02, 0)
    first = cached_document_block_mask(ids)
    assert cached_document_block_mask(ids) is first
    assert cached_document_block_mask(ids.detach()) is first  # what recomputation in backward passes
    other = ids.clone()
    other[0, 200:] += 1
    assert cached_document_block_mask(other) is not first
    ids[0, 100:] += 1  # written in place: the version changes, the stale mask is not reused
    assert cached_document_block_mask(ids) is not first


# ---------------------------------------------------------------------------- one process

def _model(extra=()):
    from packed_workers import tiny_overrides

    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.inference.model import build_inference_model

    cfg = load_config(None, tiny_overrides(["--data.reset_position_ids", "true", *extra]))
    model = build_inference_model(cfg, 8192).model
    model.train()
    return model


def _per_token(model, batch):
    mask = batch.get("document_ids", batch.get("attention_mask"))
    return model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])[0]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _one_process_packed_vs_alone(backend):
    model = _model(["--model.backend", backend])
    rows = documents()
    out = {"packed": [], "alone": []}
    model.zero_grad()
    total = 0.0
    for docs in rows:
        b = packed_batch(docs)
        losses = _per_token(model, b)
        keep = b["loss_mask"][0] > 0
        out["packed"].append(losses[keep].detach())
        total = total + losses[keep].sum()
    total.backward()
    out["packed_grads"] = _grads(model)
    model.zero_grad()
    total = 0.0
    for docs in rows:
        for d in docs:
            b = alone_batch(d)
            losses = _per_token(model, b)[:len(d) - 1]
            out["alone"].append(losses.detach())
            total = total + losses.sum()
    total.backward()
    out["alone_grads"] = _grads(model)
    out["packed"], out["alone"] = torch.cat(out["packed"]), torch.cat(out["alone"])
    return out


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_packed_text_rows_train_like_documents_alone(backend):
    got = run_distributed(_one_process_packed_vs_alone, 1, backend)[0]
    torch.testing.assert_close(got["packed"], got["alone"], rtol=1e-5, atol=1e-5)
    assert got["packed_grads"].keys() == got["alone_grads"].keys() and got["packed_grads"]
    for name, g in got["alone_grads"].items():
        torch.testing.assert_close(got["packed_grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def _mutation():
    model = _model()
    model.eval()
    a, b = documents()[0]
    base = packed_batch([a, b])
    changed_a = a.clone()
    changed_a[3] = (changed_a[3] + 17) % 4000
    mutated = packed_batch([changed_a, b])
    with torch.no_grad():
        run = lambda x: model(x["tokens"], x["position_ids"], x["document_ids"])[0]  # noqa: E731
        before, after = run(base), run(mutated)
    return {"before": before, "after": after, "a_len": len(a), "b_len": len(b)}


def test_no_attention_across_documents():
    got = run_distributed(_mutation, 1)[0]
    a, b = got["a_len"], got["b_len"]
    assert not torch.equal(got["before"][4:a], got["after"][4:a])  # the change reaches A itself
    assert torch.equal(got["before"][a:a + b], got["after"][a:a + b])  # and nothing of B, bit for bit


# ---------------------------------------------------------------------------- the pretraining data path

def test_pretrain_rows_carry_documents_to_the_model(demo_prefixes, tmp_path):
    """data.reset_attention_mask rows: the model's output on each document of a real row equals the
    document run alone (so the ids reach the attention, and positions restart)."""
    got = run_distributed(_pretrain_row_vs_alone, 1, demo_prefixes["corpus"], str(tmp_path))[0]
    assert got["documents"] >= 2
    torch.testing.assert_close(got["packed"], got["alone"], rtol=1e-5, atol=1e-5)


def _pretrain_row_vs_alone(prefix, out):
    from megatron_bluelm.config.data import DataConfig
    from megatron_bluelm.data import build_pretrain_datasets, load_tokenizer
    from megatron_bluelm.training.step import model_attention_mask

    tok = load_tokenizer(DataConfig().tokenizer_model)
    cfg = DataConfig(prefix=prefix, cache_dir=f"{out}/cache", reset_position_ids=True, reset_attention_mask=True)
    train = build_pretrain_datasets(cfg, tok, seq_length=SEQ, num_samples=(50, 0, 0), seed=1)[0]
    row = next(train[i] for i in range(len(train)) if (train[i]["tokens"][5:-5] == tok.eod).any())
    model = _model()
    model.eval()
    batch = {k: v[None] for k, v in row.items()}
    with torch.no_grad():
        packed = model(batch["tokens"], batch["position_ids"], model_attention_mask(batch))[0]
        ids = row["document_ids"]
        outs, alone = [], []
        for d in ids.unique().tolist():
            where = (ids == d).nonzero().flatten()
            toks = row["tokens"][where][None]
            outs.append(packed[where])
            alone.append(model(toks, torch.arange(toks.shape[1])[None], None)[0])
    return {"packed": torch.cat(outs), "alone": torch.cat(alone), "documents": len(outs)}


# ---------------------------------------------------------------------------- TP2 x PP2 (gloo)

LAYOUTS = {
    "tp2_sp_pp2_vpp2_selective": ["--parallel.tp", "2", "--parallel.pp", "2", "--parallel.vpp", "2",
                                  "--parallel.sequence_parallel", "true", "--training.recompute", "selective"],
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_packed_rows_train_like_documents_alone_tp2_pp2(layout):
    """Loss sums and gradients of packed rows = documents alone, under TP2 x PP2 with sequence
    parallelism, virtual stages and activation recomputation (the ids pass through its checkpoints)."""
    from packed_workers import packed_vs_alone

    results = run_distributed(packed_vs_alone, 4, LAYOUTS[layout] + ["--model.num_layers", "4"])
    last = results[-1]
    assert last["packed"]["tokens"] == last["alone"]["tokens"] == sum(n - 1 for r in documents() for n in
                                                                       map(len, r))
    assert abs(last["packed"]["loss_sum"] - last["alone"]["loss_sum"]) < 1e-4 * abs(last["alone"]["loss_sum"])
    # both packed rows in one micro-batch run folded into one row of 2 * SEQ (training/step.fold_rows),
    # through the pipeline's p2p shapes, sequence parallelism and the recomputed attention
    assert last["two_rows"]["folded"] == [(1, 2 * SEQ)] * 4 and last["packed"]["folded"] == []  # 2 x 2 chunks
    assert last["two_rows"]["tokens"] == 2 * last["alone"]["tokens"]
    assert abs(last["two_rows"]["loss_sum"] - 2 * last["alone"]["loss_sum"]) < 2e-4 * abs(last["alone"]["loss_sum"])
    for r in results:
        for name, g in r["alone"]["grads"].items():
            torch.testing.assert_close(r["packed"]["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(r["two_rows"]["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------- folding rows

def _two_rows():
    from packed_workers import packed_batch, stack_rows

    return stack_rows([packed_batch(r) for r in documents()])


def test_fold_rows_offsets_documents_past_earlier_rows():
    from megatron_bluelm.training.step import fold_rows

    batch = _two_rows()
    batch["attention_mask"] = torch.ones(2, 1, SEQ, SEQ, dtype=torch.bool)
    folded = fold_rows(batch)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(folded[key], batch[key].reshape(1, 2 * SEQ)), key
    ids = folded["document_ids"][0]
    first = batch["document_ids"][0]
    assert torch.equal(ids[:SEQ], first)
    assert torch.equal(ids[SEQ:], batch["document_ids"][1] + int(first.max()) + 1)
    assert bool((ids[1:] >= ids[:-1]).all())  # still one sorted run per document: the varlen path
    assert folded["attention_mask"] is None
    with pytest.raises(ValueError, match="no document_ids"):
        fold_rows({"tokens": batch["tokens"], "document_ids": None})
    with pytest.raises(ValueError, match="loss_mask"):
        fold_rows(dict(batch, loss_mask=batch["loss_mask"][:, :-1]))


def _folding():
    from megatron_bluelm.training import step
    from megatron_bluelm.training.step import fold_rows, plan_row_folding

    model = _model(["--data.reset_attention_mask", "true"])
    model.eval()
    batch = _two_rows()
    def losses(b):  # per-token losses [rows, s]
        return model(b["tokens"], b["position_ids"], b["document_ids"], labels=b["labels"])

    with torch.no_grad():
        rows, folded = losses(batch), losses(fold_rows(batch))
        crossing = losses(dict(fold_rows(batch), document_ids=batch["document_ids"].reshape(1, -1)))
    second = dict(batch, tokens=batch["tokens"] + 1)
    fold_on_cpu = plan_row_folding([model], [iter([batch])], 2)[1]  # ROW_FOLDING None: CUDA only
    step.ROW_FOLDING = True
    iterators, fold = plan_row_folding([model], [iter([batch, second])], 2)
    plain = {k: v for k, v in batch.items() if k != "document_ids"}
    return {"rows": rows, "folded": folded, "crossing": crossing, "fold": fold, "fold_on_cpu": fold_on_cpu,
            "order": [torch.equal(b["tokens"], want["tokens"]) for b, want in zip(iterators[0], [batch, second])],
            "fold_one_row": plan_row_folding([model], [iter([batch])], 1)[1],
            "fold_plain": plan_row_folding([model], [iter([plain])], 2)[1]}


def test_folded_row_computes_what_its_rows_do():
    """The model on the folded [1, 2s] row gives the per-token losses of the [2, s] micro-batch; with the
    ids not offset, the second row's first document would attend to the first row's (same id): that
    mutation changes them. The step folds only micro-batches of several rows of documents (by default
    only on CUDA), and its peek at the first micro-batch loses none."""
    got = run_distributed(_folding, 1)[0]
    torch.testing.assert_close(got["folded"].reshape(2, SEQ), got["rows"], rtol=1e-5, atol=1e-5)
    assert (got["crossing"].reshape(2, SEQ)[1] - got["rows"][1]).abs().max() > 1e-3
    assert got["fold"] and got["order"] == [True, True]
    assert not got["fold_on_cpu"]  # by default CPU does not fold: its dense mask would grow b-fold
    assert not got["fold_one_row"] and not got["fold_plain"]


# ---------------------------------------------------------------------------- SFT rows

def test_sft_rows_count_truncated_samples_and_carry_document_ids(tmp_path):
    import json

    import numpy as np

    from megatron_bluelm.config.data import BUNDLED_TOKENIZER
    from megatron_bluelm.data.sft import ChatOptions, preprocess_chat, toy_reverse_conversations
    from megatron_bluelm.data.sft_packing import PackedSFTDataset

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_reverse_conversations(40, seed=2)))
    preprocess_chat(ChatOptions([str(path)], str(tmp_path / "sft"), BUNDLED_TOKENIZER, seed=0))
    prefix = str(tmp_path / "sft_text_document")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(prefix)  # alive while its mmap-backed lengths are read
    lengths = np.array(index.sequence_lengths)
    seq = int(np.median(lengths))  # about half the samples are longer than a row
    ds = PackedSFTDataset(prefix, seq, (0, 40), 30, seed=0, pad_id=0)
    assert ds.truncated == int(np.sum(lengths > seq + 1)) > 0
    row = ds[0]
    assert "attention_mask" not in row and row["document_ids"].shape == (seq,)
    assert (row["document_ids"][1:] >= row["document_ids"][:-1]).all()
