"""Packed multimodal rows (data/mm_packing.py): tile bound, layout, mixture shares, exact resume, and a
packed row trains like its records one by one (losses and gradients through the ViT and the splice)."""
import numpy as np
import pytest
import torch
from distributed import phase, phases, run_distributed

from megatron_bluelm.config.loader import load_config

SEQ = 256


@pytest.fixture(scope="module")
def mixture(mm_prefix, demo_prefix, tmp_path_factory):
    path = tmp_path_factory.mktemp("mix") / "mix.yaml"
    path.write_text(f"sources:\n  - {{prefix: {mm_prefix}, weight: 6}}\n  - {{prefix: {demo_prefix}, weight: 4}}\n")
    return str(path)


def _cfg(mixture, extra=()):
    import os

    cache = os.path.join(os.path.dirname(mixture), "cache")
    cfg = load_config(None, ["--data.seq_length", str(SEQ), "--data.mixture", mixture, "--data.split", "1,0,0",
                             "--data.cache_dir", cache,
                             "--model.preset", "tiny", "--vision.preset", "vit-tiny", "--vision.max_tiles", "4",
                             "--vision.pack", "true", "--model.backend", "torch", *extra])
    cfg.vision.resolve()
    return cfg


def _build(cfg, rows=60, seed=3, with_pixels=True):
    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.data.mm_packing import build_packed_multimodal_datasets

    tok = load_tokenizer(cfg.data.tokenizer_model)
    return build_packed_multimodal_datasets(cfg, tok, num_samples=(rows, 0, 0), seed=seed,
                                            with_pixels=with_pixels)[0], tok


def test_ffd_respects_both_bounds_and_places_every_item_once():
    from megatron_bluelm.data.mm_packing import pack_ffd

    rng = np.random.RandomState(0)
    lengths, tiles = rng.randint(10, 200, 500), rng.randint(0, 8, 500)
    rows = pack_ffd(lengths, tiles, 257, 9, 128, np.random.RandomState(1))
    items = np.concatenate(rows)
    assert sorted(items.tolist()) == list(range(500))
    assert all(lengths[r].sum() <= 257 and tiles[r].sum() <= 9 for r in rows)
    lower = max(np.ceil(lengths.sum() / 257), np.ceil(tiles.sum() / 9))
    assert len(rows) <= 1.25 * lower + 4  # FFD near the bin-count lower bound (4 buffers, one tail each)


def test_rows_keep_the_tile_bound_and_the_record_layout(mixture):
    from megatron_bluelm.data.images import IMAGE

    # the largest record holds two 5-tile images; the tokens alone would allow 16 tiles a row
    cfg = _cfg(mixture, ["--vision.max_tiles_per_microbatch", "20", "--training.micro_batch_size", "2"])
    ds, tok = _build(cfg)
    image, tpt = tok.special_ids[IMAGE], cfg.vision.tokens_per_tile
    assert ds.stats.rows == 60 and ds.stats.tiles > 0
    with_images = 0
    for i in range(len(ds)):
        row = ds[i]
        assert row["num_tiles"] <= 10 and row["pixel_values"].shape[0] == row["num_tiles"]  # 20 / mbs 2
        assert int((row["tokens"] == image).sum()) + int(row["labels"][-1] == image) == row["num_tiles"] * tpt
        ids, pos = row["document_ids"], row["position_ids"]
        assert (ids[1:] >= ids[:-1]).all()
        starts = torch.cat([torch.tensor([True]), ids[1:] != ids[:-1]])
        assert (pos[starts] == 0).all() and (pos[~starts] == pos[:-1][~starts[1:]] + 1).all()
        assert (row["loss_mask"][:-1][ids[1:] != ids[:-1]] == 0).all()  # never learn the next record's token
        with_images += row["num_tiles"] > 0
    assert with_images >= 10
    small = _cfg(mixture, ["--vision.max_tiles_per_microbatch", "8"])
    with pytest.raises(Exception, match="max_tiles_per_microbatch: record .* tiles, more than a row may hold"):
        _build(small)


def test_mixture_weights_are_token_shares(mixture):
    ds, _ = _build(_cfg(mixture), rows=200)
    shares = np.array(ds.stats.source_tokens) / ds.stats.tokens
    assert abs(shares[0] - 0.6) < 0.03, shares


def test_packed_order_is_deterministic_and_resumes_exactly(mixture):
    import glob
    import os

    from megatron_bluelm.data import build_data_iterator
    from megatron_bluelm.data.multimodal_dataset import collate

    cfg = _cfg(mixture)
    for old in glob.glob(os.path.join(cfg.data.cache_dir, "mm_meta", "*.npz")):
        os.remove(old)
    a, _ = _build(cfg, with_pixels=False)  # scans the image headers, writes the metadata cache
    assert len(glob.glob(os.path.join(cfg.data.cache_dir, "mm_meta", "*.npz"))) == 1
    b, _ = _build(cfg, with_pixels=False)  # reads it
    assert [a.records_of(i) for i in range(len(a))] == [b.records_of(i) for i in range(len(b))]
    assert np.array_equal(a.sources[0].length, b.sources[0].length) and np.array_equal(a.sources[0].tiles,
                                                                                       b.sources[0].tiles)
    c, _ = _build(cfg, seed=4, with_pixels=False)
    assert [a.records_of(i) for i in range(len(a))] != [c.records_of(i) for i in range(len(c))]

    def batches(consumed, n, rank=0):
        it = build_data_iterator(a, micro_batch_size=2, consumed_samples=consumed, dp_rank=rank, dp_size=2,
                                 collate_fn=collate)
        return [next(it) for _ in range(n)]

    whole, resumed = batches(0, 6), batches(8, 4)  # 2 global batches of 4 consumed, then resume
    for x, y in zip(whole[2:], resumed):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_mixture_without_pack_is_refused(mixture):
    from megatron_bluelm.config.errors import ConfigError
    from megatron_bluelm.stages.multimodal import multimodal_config

    cfg = _cfg(mixture, ["--vision.pack", "false"])
    with pytest.raises(ConfigError, match="vision.pack: true"):
        multimodal_config(cfg)


# ------------------------------------------------------------------ packed == records alone (model)

def _alone_row(parts, pad):
    """One record alone: its tokens at positions 0.., padded, plain causal attention."""
    from megatron_bluelm.data.mm_packing import build_mm_row

    row = build_mm_row(parts, SEQ, pad)
    row.pop("document_ids")
    row["position_ids"] = torch.arange(SEQ)
    return row


def _mm_packed_vs_alone(mixture):
    from megatron_bluelm.inference.model import build_inference_model

    cfg = _cfg(mixture)
    ds, tok = _build(cfg)
    # a row with at least two records, one of them with images
    idx = next(i for i in range(len(ds)) if len(ds.rows[i]) >= 2 and ds[i]["num_tiles"] > 0)
    model = build_inference_model(cfg, tok.vocab_size, tok.special_ids["<image>"]).model
    model.train()
    parts = []
    for i in ds.rows[idx]:
        s, p = ds.sources[ds.src[i]], ds.pos[i]
        parts.append(s.read(int(s.index[p]), int(s.offset[p]), int(s.length[p]), True))

    def run(row, mask):
        b = {k: (v[None] if torch.is_tensor(v) and k != "pixel_values" else v) for k, v in row.items()}
        return model(b["tokens"], b["position_ids"], mask(b), labels=b["labels"],
                     pixel_values=b["pixel_values"])[0]

    row = ds[idx]
    model.zero_grad()
    losses = run(row, lambda b: b["document_ids"])
    keep = row["loss_mask"] > 0
    packed = losses[keep]
    packed.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone, total = [], 0.0
    for part in parts:
        r = _alone_row([part], tok.pad)
        k = r["loss_mask"] > 0
        out = run(r, lambda b: None)[k]
        alone.append(out)
        total = total + out.sum()
    total.backward()
    alone_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"packed": packed.detach(), "alone": torch.cat(alone).detach(), "records": len(parts),
            "packed_grads": packed_grads, "alone_grads": alone_grads}


def test_packed_multimodal_row_trains_like_records_alone(mixture):
    got = run_distributed(_mm_packed_vs_alone, 1, mixture)[0]
    assert got["records"] >= 2
    torch.testing.assert_close(got["packed"], got["alone"], rtol=1e-5, atol=1e-5)
    assert any("vision_model" in n for n in got["alone_grads"])  # the ViT is in the comparison
    for name, g in got["alone_grads"].items():
        # sums over many tokens in another order: fp32 noise relative to the tensor's scale
        torch.testing.assert_close(got["packed_grads"][name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()),
                                   msg=name)


def test_packed_multimodal_stage_trains(mixture, tmp_path):
    """The stage end to end on packed rows (mixture of image-text and text, tile bound): the loss falls."""
    from mm_workers import train_mm

    args = ["--data.seq_length", str(SEQ), "--data.mixture", mixture, "--data.split", "1,0,0",
            "--model.preset", "tiny", "--vision.preset", "vit-tiny", "--vision.max_tiles", "4",
            "--vision.pack", "true", "--vision.max_tiles_per_microbatch", "12",
            "--training.train_steps", "4", "--training.micro_batch_size", "1", "--training.global_batch_size", "2",
            "--training.eval_interval", "0", "--optimizer.lr", "3e-3", "--schedule.warmup_steps", "1",
            "--logging.output_dir", str(tmp_path), "--logging.tensorboard", "false", "--logging.log_interval", "100",
            "--data.cache_dir", str(tmp_path / "cache")]
    losses = run_distributed(train_mm, 1, args)[0]["losses"]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_bench_counts_useful_flops_only_and_runs_its_attention_section(mixture):
    """tools/bench/multimodal_bench.py: padding adds no FLOPs, attention counts sum len^2, tiles count the
    ViT; and its attention section runs at a tiny size."""
    import importlib.util
    import os

    from megatron_bluelm.config.presets import apply_preset
    from megatron_bluelm.models.counting import DecoderShape, layer_matmul_params

    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "bench", "multimodal_bench.py")
    spec = importlib.util.spec_from_file_location("multimodal_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = _cfg(mixture)
    apply_preset(cfg.model)
    ids = torch.tensor([[0] * 100 + [1] * 50 + [2] * 106])
    batch = {"document_ids": ids, "useful_tokens": torch.tensor([150]), "pixel_values": torch.zeros(0, 3, 112, 112)}
    d = DecoderShape.from_model_config(cfg.model, 8192)
    p = d.num_layers * layer_matmul_params(d) + d.vocab_size * d.hidden_size
    attn = 12 * d.num_layers * d.num_attention_heads * d.head_dim
    assert bench.useful_flops(cfg, 8192, [batch]) == pytest.approx(6 * p * 150 + attn * (100**2 + 50**2))
    with_tiles = dict(batch, pixel_values=torch.zeros(3, 3, 112, 112))
    assert bench.useful_flops(cfg, 8192, [with_tiles]) > bench.useful_flops(cfg, 8192, [batch])
    # the stage's logged FLOPs of packed rows (from the packing stats) = the bench's count over the rows
    from megatron_bluelm.data.multimodal_dataset import collate
    from megatron_bluelm.stages.multimodal import packed_flops_per_position

    ds, _ = _build(cfg, rows=20)
    batches = [collate([ds[i]]) for i in range(len(ds))]
    stage = packed_flops_per_position(cfg, 8192, ds.stats) * len(ds) * SEQ
    assert stage == pytest.approx(bench.useful_flops(cfg, 8192, batches), rel=0.01)
    bench.main(["--only", "attn", "--attn-seq", "512", "--attn-heads", "2,1", "--attn-dim", "16",
                "--attn-docs", "8", "--steps", "1", "--warmup", "0"])


def _mm_packed_vs_alone_parallel(mixture, extra, alone_too=True):
    """Packed rows vs their records alone through the schedule in a TP x PP layout (gradients, loss);
    ``alone_too=False``: the packed rows only."""
    import os
    import sys
    from functools import partial

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data"))
    from megatron.core import parallel_state
    from packed_workers import _grads_and_loss  # the schedule + gathered-gradient helper of the text tests

    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.models.multimodal import build_vlm
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.stages.multimodal import multimodal_config
    from megatron_bluelm.training.loop import prepare_config, setup_run

    cfg = multimodal_config(_cfg(mixture, ["--training.train_steps", "1", "--training.global_batch_size", "2",
                                           "--training.eval_interval", "0", "--schedule.warmup_steps", "0",
                                           "--logging.tensorboard", "false", "--logging.output_dir",
                                           os.path.join(os.path.dirname(mixture), "log"), *extra]))
    prepare_config(cfg)
    tok = load_tokenizer(cfg.data.tokenizer_model)
    run = setup_run(cfg, partial(build_vlm, cfg, tok.vocab_size, tok.special_ids["<image>"]), 0.0)
    try:
        ds, _ = _build(cfg)
        rows = [i for i in range(len(ds)) if len(ds.rows[i]) >= 2 and ds[i]["num_tiles"] > 0][:2]
        packed, alone = [], []
        for i in rows:
            packed.append(ds[i])
            for k in ds.rows[i]:
                s, p = ds.sources[ds.src[k]], ds.pos[k]
                alone.append(_alone_row([s.read(int(s.index[p]), int(s.offset[p]), int(s.length[p]), True)], tok.pad))
        as_batch = lambda r: {k: (v[None] if torch.is_tensor(v) and k != "pixel_values" else v)  # noqa: E731
                              for k, v in r.items() if k not in ("num_tiles", "useful_tokens")}
        out = {"packed": _grads_and_loss(run, [as_batch(r) for r in packed], SEQ),
               "layout": {"tp": parallel_state.get_tensor_model_parallel_world_size(),
                          "pp": parallel_state.get_pipeline_model_parallel_world_size(),
                          "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
                          "sp": run.cfg.parallel.sequence_parallel}}
        if alone_too:
            out["alone"] = _grads_and_loss(run, [as_batch(r) for r in alone], SEQ)
        return out
    finally:
        teardown()


@pytest.mark.slow
def test_sequence_parallel_and_virtual_stages_equal_one_rank(mixture):
    """TP2 with sequence parallelism (each rank splices the image embeddings of its sequence chunk; the
    adapter stays unsplit) and PP2 x VPP2 (the ViT and adapter on the first chunk of the first stage,
    the interleaved schedule): the loss and every gathered gradient, ViT and adapter included, equal
    the 1-rank model's on the same packed rows."""
    one = run_distributed(_mm_packed_vs_alone_parallel, 1, mixture, [], False)[0]["packed"]
    assert any(k.startswith("vision_model.") for k in one["grads"])
    assert any(k.startswith("adapter.") for k in one["grads"])
    layouts = {"tp2_sp": (["--parallel.tp", "2", "--parallel.sequence_parallel", "true"],
                          {"tp": 2, "pp": 1, "vpp": None, "sp": True}),
               "pp2_vpp2": (["--parallel.pp", "2", "--parallel.vpp", "2", "--training.micro_batch_size", "1"],
                            {"tp": 1, "pp": 2, "vpp": 2, "sp": False})}
    # both layouts in one start of the 2 ranks, one after the other (each its own process group; no
    # checkpoint, so no state of the first layout's carries over), each checked to run as asked
    both = run_distributed(phases, 2, [phase(_mm_packed_vs_alone_parallel, mixture, extra, False)
                                       for extra, _ in layouts.values()])
    for i, (layout, (_, want)) in enumerate(layouts.items()):
        results = [rank[i] for rank in both]
        assert all(r["layout"] == want for r in results), (layout, [r["layout"] for r in results])
        last = results[-1]["packed"]  # the last pipeline stage reports the loss
        assert last["tokens"] == one["tokens"] > 0, layout
        assert abs(last["loss_sum"] - one["loss_sum"]) < 1e-5 * abs(one["loss_sum"]), layout
        for r in results:
            got = r["packed"]["grads"]
            assert got.keys() == one["grads"].keys(), layout
            for name, g in one["grads"].items():
                torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()),
                                           msg=f"{layout}: {name}")


@pytest.mark.slow
def test_packed_multimodal_rows_train_like_records_alone_tp2_pp2(mixture):
    """Under TP2 x PP2 (the ViT and the splice on the first stage, the ids on both): loss sums and every
    gathered gradient of packed rows = their records alone."""
    results = run_distributed(_mm_packed_vs_alone_parallel, 4, mixture, ["--parallel.tp", "2", "--parallel.pp", "2"])
    last = results[-1]
    assert last["packed"]["tokens"] == last["alone"]["tokens"] > 0
    assert abs(last["packed"]["loss_sum"] - last["alone"]["loss_sum"]) < 1e-4 * abs(last["alone"]["loss_sum"])
    for r in results:
        for name, g in r["alone"]["grads"].items():
            torch.testing.assert_close(r["packed"]["grads"][name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()),
                                       msg=name)
