"""Packed multimodal training, per-document attention, and the cost of document masking in pretraining.

    # CPU smoke run (tiny model, seconds)
    python tools/bench/multimodal_bench.py --preset tiny --vision vit-tiny --seq 256 --records 120 \\
        --steps 2 --warmup 1 --attn-seq 1024 --attn-heads 2,1 --attn-dim 32
    # one H200 / H100 (full model; about 10 minutes)
    python tools/bench/multimodal_bench.py --preset bluelm-2.5-3b --vision vit-so400m --seq 4096 \\
        --records 3000 --mbs 1 --microbatches 8 --steps 8 --warmup 3 --recompute none --out mm_bench.json

Sections (``--only mm,attn,text``):

mm    A record distribution made from the bundled images: each image record takes one bundled image
      rescaled by a log-uniform factor (aspect ratio jittered) so that the dynamic-resolution grid
      spans 1-7 tiles (at their native ~320 px every bundled image is one so400m tile), a caption of
      16-256 tokens, and 40% of the records are text documents (the bundled corpus). The same records
      are trained packed (data/mm_packing.py) and unpacked (one record per row, padded). Per variant:
      padding fraction of the computed positions, useful tokens/s, model TFLOP/s and MFU on useful
      work only, peak memory, and a split of one step into loader / ViT / adapter / decoder+optimizer.
      Useful FLOPs of a step (forward + backward = 3 x forward, models/counting.py's convention):
        decoder   6 * P_matmul * T_useful + 12 * L * d_attn * sum_docs len_doc^2
                  (P_matmul: the layers' matmuls + the output layer; ``mfu_head_on_loss_tokens`` counts
                  the output layer only on the T_loss positions with a loss: 6 * P_layers * T_useful
                  + 6 * V * H * T_loss + the attention term)
        ViT       3 * tiles * vision_flops_per_tile   (patch conv, QKV/proj/MLP, full attention)
        adapter   3 * tiles * tokens_per_tile * 2 * (4 * h_vit * a + a * H)
      (T_useful = record tokens, padding excluded; each document attends only to itself.) The split:
      loader = time in the data iterator; ViT and adapter = their forward + backward timed alone on
      the same micro-batches' tiles; decoder+optimizer = the rest of the step. Before timing, the ViT
      runs once at every micro-batch tile count the packing allows (``prewarm_tile_counts``: a long
      run's steady state; the first time a count is met costs ~0.2 s of cuDNN plan building);
      ``--no-prewarm`` times the cold state.
attn  Attention forward + backward at --attn-seq (32k) tokens holding many documents: FlexAttention
      with the per-micro-batch block mask (its build timed apart), the path bluelm_kernels/attention.py
      dispatches to (variable-length flash on CUDA), and causal SDPA over the whole row, equal total
      tokens; the work ratio sum len^2 / s^2 beside the time ratios.
text  Text pretraining steps (decoder, fwd + bwd) with document ids (data.reset_attention_mask) vs
      the same batches unmasked.

CUDA timings synchronize around each region; on CPU the numbers only show the script runs.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import math
import os
import sys
import tempfile
import time
from functools import partial

import numpy as np
import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, REPO)

from megatron_bluelm.config.data import ASSETS, BUNDLED_TOKENIZER  # noqa: E402
from megatron_bluelm.config.loader import load_config  # noqa: E402

IMAGES = ("astronaut.jpg", "camera.png", "chelsea.jpg", "coffee.jpg", "hubble.jpg", "rocket.jpg", "rocket_tall.jpg")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _now():
    _sync()
    return time.perf_counter()


# ------------------------------------------------------------------ the record distribution

def make_records(out: str, n_images: int, tile: int, seed: int) -> str:
    """Image-text records from the bundled images (module docstring); returns the multimodal prefix."""
    from PIL import Image

    from megatron_bluelm.data.demo import PYTHON_DOCS
    from megatron_bluelm.data.multimodal import MultimodalOptions, preprocess_multimodal

    rng = np.random.RandomState(seed)
    with gzip.open(PYTHON_DOCS, "rt") as f:  # caption words from the bundled corpus
        words = " ".join(json.loads(line)["text"] for line in f).split()
    variants = []  # a few dozen rescaled images, shared by the records
    for k in range(48):
        src = Image.open(os.path.join(ASSETS, "images", IMAGES[k % len(IMAGES)])).convert("RGB")
        scale = math.exp(rng.uniform(math.log(0.8), math.log(3.6))) * tile / max(src.size)
        aspect = math.exp(rng.uniform(-0.4, 0.4))
        w, h = max(16, int(src.width * scale * aspect)), max(16, int(src.height * scale / aspect))
        path = os.path.join(out, f"img{k}.jpg")
        src.resize((w, h), Image.BICUBIC).save(path, quality=90)
        variants.append(os.path.basename(path))
    with open(os.path.join(out, "records.jsonl"), "w") as f:
        for _ in range(n_images):
            n_words = int(rng.randint(12, 190))  # ~16-256 tokens with the bundled tokenizer
            start = int(rng.randint(0, len(words) - n_words))
            caption = " ".join(words[start:start + n_words])
            record = {"images": [variants[rng.randint(len(variants))]], "text": "<image>\n" + caption}
            f.write(json.dumps(record) + "\n")
    prefix = os.path.join(out, "mm")
    preprocess_multimodal(MultimodalOptions([os.path.join(out, "records.jsonl")], prefix, BUNDLED_TOKENIZER))
    return prefix + "_text_document"


def text_prefix(out: str) -> str:
    from megatron_bluelm.data.demo import DOCSTRINGS, PYTHON_DOCS
    from megatron_bluelm.data.preprocess import Options, preprocess

    return preprocess(Options(inputs=[PYTHON_DOCS, DOCSTRINGS], output_prefix=os.path.join(out, "text"),
                              tokenizer_model=BUNDLED_TOKENIZER, append_eod=True, workers=1,
                              progress=False)).outputs[0]


def mixture_for_text_share(out: str, mm: str, text: str, cfg, share: float) -> str:
    """A mixture YAML whose token weights give ``share`` of the *records* to text documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.data.images import ImageProcessor
    from megatron_bluelm.data.mm_packing import _MultimodalSource, _TextSource

    tok = load_tokenizer(BUNDLED_TOKENIZER)
    special = {t: tok.special_ids[t] for t in ("<image>", "<img_start>", "<img_end>")}
    row = cfg.data.seq_length + 1
    mm_src = _MultimodalSource(mm, np.arange(len(IndexedDataset(mm))), ImageProcessor.from_config(cfg.vision),
                               special, row)
    tx_src = _TextSource(text, np.arange(len(IndexedDataset(text))), row, cfg.vision.image_size)
    w_mm, w_tx = (1 - share) * mm_src.length.mean(), share * tx_src.length.mean()
    path = os.path.join(out, "mix.yaml")
    with open(path, "w") as f:
        f.write(f"sources:\n  - {{prefix: {mm}, weight: {w_mm:.6f}}}\n  - {{prefix: {text}, weight: {w_tx:.6f}}}\n")
    return path


# ------------------------------------------------------------------ FLOPs on useful work

def useful_flops(cfg, vocab: int, batches: list[dict], head_on: str = "tokens") -> float:
    """Model FLOPs of the useful work of these micro-batches (module docstring). ``head_on``: where the
    output layer (vocab x hidden) is counted: "tokens", every record token (the convention the stage's
    logged MFU shares: every position's logits are computed); "loss", only the positions with a loss
    (``loss_mask`` > 0): the logits of an ``<image>`` or prompt position feed nothing, so this is the
    stricter count of useful work."""
    from megatron_bluelm.models.counting import DecoderShape, layer_matmul_params
    from megatron_bluelm.models.multimodal import adapter_flops_per_tile, vision_flops_per_tile

    if head_on not in ("tokens", "loss"):
        raise ValueError(f"useful_flops: head_on is 'tokens' or 'loss', got {head_on!r}")
    m, v = cfg.model, cfg.vision
    d = DecoderShape.from_model_config(m, vocab)
    p_layers = d.num_layers * layer_matmul_params(d)
    p_head = d.vocab_size * d.hidden_size
    per_tile = vision_flops_per_tile(v) + adapter_flops_per_tile(v, m.hidden_size)
    total = 0.0
    for b in batches:
        for ids, useful in zip(b["document_ids"], b["useful_tokens"].tolist()):
            _, lengths = torch.unique_consecutive(ids[:useful], return_counts=True)
            sq = float((lengths.double() ** 2).sum())
            total += 6.0 * p_layers * useful + 12.0 * d.num_layers * d.num_attention_heads * d.head_dim * sq
        head_rows = b["useful_tokens"].sum() if head_on == "tokens" else (b["loss_mask"] > 0).sum()
        total += 6.0 * p_head * float(head_rows)
        total += 3.0 * int(b["pixel_values"].shape[0]) * per_tile
    return total


# ------------------------------------------------------------------ mm: packed vs unpacked

class _Timed:
    """Wraps a data iterator: time spent producing batches, and the batches themselves."""

    def __init__(self, it):
        self.it, self.seconds, self.seen = it, 0.0, []

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        b = next(self.it)
        self.seconds += time.perf_counter() - t0
        self.seen.append(b)
        return b


def _vlm(model):
    """The BlueLMVLM inside the first chunk's wrappers (DDP and any other)."""
    vlm = model[0]
    while hasattr(vlm, "module"):
        vlm = vlm.module
    return vlm


def _vit_adapter_seconds(model, batches) -> tuple[float, float]:
    """Forward + backward of the ViT and of the adapter alone on these micro-batches' tiles."""
    vlm = _vlm(model)
    from megatron_bluelm.training.step import to_device

    dev = next(vlm.parameters()).device
    vit_s = ad_s = 0.0
    for b in batches:
        px = to_device(b["pixel_values"], dev)  # as the step copies them (page-locked)
        if px.shape[0] == 0:
            continue
        t0 = _now()
        feats = vlm.vision_model(px)
        feats.float().sum().backward()
        t1 = _now()
        x = feats.detach().requires_grad_(True)
        vlm.adapter(x).float().sum().backward()
        t2 = _now()
        vit_s, ad_s = vit_s + t1 - t0, ad_s + t2 - t1
    for chunk in model:
        chunk.zero_grad_buffer()
    return vit_s, ad_s


def prewarm_tile_counts(model, cfg, max_tiles: int) -> dict:
    """The ViT + adapter forward + backward once at every tile count 1..``max_tiles`` (random pixels),
    before anything is timed: the state of a long run, which has met every micro-batch tile count the
    packing allows. What a count costs the first time it is met is host work, not GPU work: the cuDNN
    attention builds an execution plan per shape (measured ~0.2 s per new count on one H200, in the
    forward and the backward), and a run of a few steps meets new counts in most of its micro-batches.
    Returns the counts warmed and the seconds it took (CUDA only; elsewhere nothing to warm)."""
    if not torch.cuda.is_available() or max_tiles <= 0:
        return {"prewarmed_tile_counts": 0, "prewarm_s": 0.0}
    from megatron_bluelm.training.step import to_device

    vlm = _vlm(model)
    dev = next(vlm.parameters()).device
    size = cfg.vision.image_size
    t0 = _now()
    for n in range(1, max_tiles + 1):
        px = to_device(torch.rand(n, 3, size, size), dev)
        vlm.adapter(vlm.vision_model(px)).float().sum().backward()
    for chunk in model:
        chunk.zero_grad_buffer()
    return {"prewarmed_tile_counts": max_tiles, "prewarm_s": _now() - t0}


AB_VARIANTS = {  # --ab: the switches a variant turns off (rows folded; the loss on its loss rows only; ViT
    # fusions: Triton LayerNorm, every bias in its GEMM; ViT gradient kernels: the bias gradients' column
    # sums (fc1's in its GELU backward), the QKV split's one-launch backward; residual norms: the layers'
    # residual adds in the norms; deferred clip: the clip coefficient applied inside the fused Adam kernel)
    "all": {},
    "no_vit_grad_kernels": dict(vit_grad_kernels=False),
    "no_row_folding": dict(fold=False),
    "no_vit_fusions": dict(vit_fusions=False),
    "no_loss_rows": dict(loss_rows=False),
    "no_residual_norms": dict(residual_norms=False),
    "no_deferred_clip": dict(deferred_clip=False),
    "none_of_these": dict(vit_grad_kernels=False, residual_norms=False, deferred_clip=False),
}


def _set_switches(vlm, bda_fusion: bool, fold=None, vit_fusions: bool = True, vit_grad_kernels: bool = True,
                  loss_rows: bool = True, residual_norms: bool = True, deferred_clip: bool = True) -> None:
    from megatron_bluelm.models import vision
    from megatron_bluelm.models.attention import BlueLMSelfAttention
    from megatron_bluelm.models.layer import ResidualNormLayer
    from megatron_bluelm.training import model_setup, step

    ResidualNormLayer.fusion = residual_norms
    model_setup.DEFER_CLIP = deferred_clip
    step.ROW_FOLDING = fold
    step.LOSS_ROWS = loss_rows
    vision.FusedLayerNorm.kernel = vit_fusions
    vision.EpilogueColumnParallelLinear.epilogue = vit_fusions
    vision.EpilogueRowParallelLinear.epilogue = vit_fusions
    vision._BiasEpilogueLinear.bias_kernel = vit_grad_kernels
    vision.EpilogueColumnParallelLinear.gelu_fusion = vit_grad_kernels
    for m in vlm.vision_model.modules():
        if isinstance(m, BlueLMSelfAttention):
            m.split_fn = vision._fused_split_qkv if vit_grad_kernels else None
    # megatron-core reads it at every forward; on where the backend has it on (fused)
    vlm.vision_model.config.bias_dropout_fusion = vit_fusions and bda_fusion


def _ab_rounds(run, it, kw, args) -> dict:
    """Alternate the AB_VARIANTS on one model, ``args.ab`` rounds, each variant replaying the same
    ``args.steps`` steps' micro-batches (drawn once from ``it``: the work per step varies with the rows'
    tiles and documents, so every variant times the same rows); each variant warmed once first, and
    each round starts at the next variant (no variant always runs after the same one). Seconds per
    step, median over rounds."""
    from megatron_bluelm.training.step import train_step

    vlm = _vlm(run.model)
    bda = vlm.vision_model.config.bias_dropout_fusion
    n = kw["num_microbatches"]
    replay = [next(it) for _ in range(args.steps * n)]

    def steps():
        for i in range(args.steps):
            train_step(run.model, run.optimizer, run.scheduler, [iter(replay[i * n:(i + 1) * n])], **kw)

    names = args.ab_variants.split(",")
    unknown = [name for name in names if name not in AB_VARIANTS]
    if unknown or "all" not in names:
        raise SystemExit(f"--ab-variants {args.ab_variants}: names from {list(AB_VARIANTS)}, 'all' among them")
    times = {name: [] for name in names}
    for name in names:
        _set_switches(vlm, bda, **AB_VARIANTS[name])
        train_step(run.model, run.optimizer, run.scheduler, [iter(replay[:n])], **kw)
    for r in range(args.ab):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each round starts one later
            _set_switches(vlm, bda, **AB_VARIANTS[name])
            t0 = _now()
            steps()
            times[name].append((_now() - t0) / args.steps)
    _set_switches(vlm, bda)  # every switch back to its default (folding: the step's own choice)
    med = {name: float(np.median(t)) for name, t in times.items()}
    out = {"ab_step_s": med, "ab_rounds_s": times}
    for name in names:
        print(f"  ab {name:16s} {med[name]:.4f} s/step ({med[name] / med['all']:.3f}x all)  rounds "
              f"{[round(t, 4) for t in times[name]]}", flush=True)
    return out


def bench_mm_variant(cfg, dataset, name: str, args, vocab: int, image_id: int) -> dict:
    from bluelm_kernels import sdpa_choice
    from megatron_bluelm.data import build_data_iterator
    from megatron_bluelm.data.multimodal_dataset import collate
    from megatron_bluelm.models.multimodal import build_vlm
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training.logging import device_peak_tflops
    from megatron_bluelm.training.loop import setup_run
    from megatron_bluelm.training.step import train_step

    run = setup_run(cfg, partial(build_vlm, cfg, vocab, image_id), 0.0)
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        it = _Timed(build_data_iterator(dataset, micro_batch_size=args.mbs, consumed_samples=0, dp_rank=0,
                                        dp_size=1, num_workers=args.workers, collate_fn=collate))
        kw = dict(num_microbatches=args.microbatches, seq_length=cfg.data.seq_length, micro_batch_size=args.mbs,
                  device=run.info.device)
        for _ in range(args.warmup):
            train_step(run.model, run.optimizer, run.scheduler, [it], **kw)
        from megatron_bluelm.data.mm_packing import tiles_per_row

        warm = prewarm_tile_counts(run.model, cfg, tiles_per_row(cfg) * args.mbs if args.prewarm else 0)
        ab = _ab_rounds(run, it, kw, args) if args.ab else {}
        it.seconds, it.seen = 0.0, []
        t0 = _now()
        for _ in range(args.steps):
            train_step(run.model, run.optimizer, run.scheduler, [it], **kw)
        step_s = (_now() - t0) / args.steps
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        vit_s, ad_s = _vit_adapter_seconds(run.model, it.seen)
        rows = it.seen
        positions = sum(int(b["tokens"].numel()) for b in rows)
        useful = sum(int(b["useful_tokens"].sum()) for b in rows)
        tiles = sum(int(b["pixel_values"].shape[0]) for b in rows)
        flops = useful_flops(cfg, vocab, rows) / args.steps
        strict = useful_flops(cfg, vocab, rows, head_on="loss") / args.steps
        peak = device_peak_tflops(None)
        loader = it.seconds / args.steps
        vit, adapter = vit_s / args.steps, ad_s / args.steps
        out = {"variant": name, "step_s": step_s, "padding": 1 - useful / positions,
               "useful_tokens_per_s": useful / args.steps / step_s, "tiles_per_step": tiles / args.steps,
               "tflops": flops / step_s / 1e12, "mfu": (flops / step_s / 1e12 / peak) if peak else None,
               "mfu_head_on_loss_tokens": (strict / step_s / 1e12 / peak) if peak else None,
               "loss_token_share": float(sum(int((b["loss_mask"] > 0).sum()) for b in rows)) / max(useful, 1),
               "peak_mem_gib": mem, "loader_s": loader, "vit_s": vit, "adapter_s": adapter,
               "decoder_optimizer_s": step_s - loader - vit - adapter,
               # the ViT attention's SDPA backend per shape (vision.attention_backend measure)
               "vit_sdpa_backends": sorted({str(c) for c in sdpa_choice.CHOICES.values()}), **warm, **ab}
        return out
    finally:
        teardown()


class _Unpacked(torch.utils.data.Dataset):
    """The same records as a packed dataset, one per row (padded)."""

    def __init__(self, packed):
        self.packed = packed
        self.items = [np.array([i]) for r in packed.rows for i in r]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        p = self.packed
        rows, p.rows = p.rows, self.items
        try:
            return p[idx]
        finally:
            p.rows = rows


def section_mm(args) -> list[dict]:
    from megatron_bluelm.config.presets import apply_preset
    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.data.mm_packing import build_packed_multimodal_datasets
    from megatron_bluelm.stages.multimodal import multimodal_config

    tok = load_tokenizer(BUNDLED_TOKENIZER)
    results = []
    with tempfile.TemporaryDirectory() as out:
        base = ["--model.preset", args.preset, "--vision.preset", args.vision, "--vision.max_tiles", "6",
                "--data.seq_length", str(args.seq), "--data.split", "1,0,0", "--training.micro_batch_size",
                str(args.mbs), "--training.global_batch_size", str(args.mbs * args.microbatches),
                "--training.train_steps", str(args.warmup + args.steps), "--training.eval_interval", "0",
                "--schedule.warmup_steps", "1", "--training.recompute", args.recompute,
                "--logging.output_dir", os.path.join(out, "log"), "--logging.tensorboard", "false",
                "--checkpoint.save", "none", "--model.backend", args.backend, "--vision.pack", "true"]
        if args.max_tiles_per_microbatch:
            base += ["--vision.max_tiles_per_microbatch", str(args.max_tiles_per_microbatch)]
        cfg = load_config(None, base)
        cfg.vision.resolve()
        mm = make_records(out, args.records, cfg.vision.image_size, args.seed)
        mix = mixture_for_text_share(out, mm, text_prefix(out), cfg, 0.4)
        cfg = multimodal_config(load_config(None, base + ["--data.mixture", mix]))
        apply_preset(cfg.model)
        vocab = cfg.model.vocab_size or tok.vocab_size
        steps = args.warmup + args.steps + (args.steps if args.ab else 0)
        rows = args.mbs * args.microbatches * steps
        packed = build_packed_multimodal_datasets(cfg, tok, num_samples=(rows, 0, 0), seed=args.seed)[0]
        st = packed.stats
        tiles = np.concatenate([s.tiles[s.tiles > 0] for s in packed.sources])
        print(f"records: {st.records} in {st.rows} packed rows; tiles per image {np.bincount(tiles).tolist()} "
              f"(index = tiles); token share of text {st.source_tokens[1] / st.tokens:.1%}", flush=True)
        for name in args.variants.split(","):
            ds = _Unpacked(packed) if name == "unpacked" else packed
            cfg.training.fused_wgrad_accumulation = name != "packed_unfused_wgrad"
            release_memory()
            results.append(bench_mm_variant(cfg, ds, name, args, vocab, tok.special_ids["<image>"]))
            print(json.dumps(results[-1]), flush=True)
    return results


# ------------------------------------------------------------------ attn: flex vs causal SDPA

def doc_lengths(total: int, n_docs: int, seed: int) -> list[int]:
    rng = np.random.RandomState(seed)
    w = rng.lognormal(0.0, 1.0, n_docs)
    lengths = np.maximum((w / w.sum() * total).astype(int), 1)
    lengths[-1] += total - lengths.sum()
    return lengths.tolist()


def _timed(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = _now()
    for _ in range(steps):
        fn()
    return (_now() - t0) / steps


def section_attn(args) -> list[dict]:
    import torch.nn.functional as F

    from bluelm_kernels.attention import PATHS, attention, document_block_mask

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    nq, nkv = (int(x) for x in args.attn_heads.split(","))
    s, d = args.attn_seq, args.attn_dim
    lengths = doc_lengths(s, args.attn_docs, args.seed)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(dev, torch.int32)
    q = torch.randn(1, nq, s, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(1, nkv, s, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(1, nkv, s, d, device=dev, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, nq, s, d, device=dev, dtype=dtype)
    build = _timed(lambda: document_block_mask(ids), 1, 3)
    mask = document_block_mask(ids) if dev == "cuda" else None
    results = []
    for name, fn in (("flex_documents", lambda: attention(q, k, v, document_ids=ids, block_mask=mask)),
                     ("documents", lambda: attention(q, k, v, document_ids=ids)),  # the dispatched path
                     ("sdpa_causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                            enable_gqa=nq != nkv))):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sec = _timed(lambda fn=fn: fn().backward(grad), args.warmup, max(args.steps, 3))
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        results.append({"variant": name, "fwd_bwd_ms": sec * 1e3, "peak_mem_gib": mem})
    work = sum(n * n for n in lengths) / (s * s)
    results[0].update(block_mask_build_ms=build * 1e3, documents=len(lengths), sum_len2_over_s2=work)
    for r in results[:2]:
        r["time_ratio_vs_causal"] = r["fwd_bwd_ms"] / results[2]["fwd_bwd_ms"]
    PATHS.clear()
    attention(q, k, v, document_ids=ids)
    results[1]["path"] = next(p for p in ("sdpa", "varlen", "flex", "dense") if PATHS[p])
    for r in results:
        print(json.dumps(r), flush=True)
    return results


# ------------------------------------------------------------------ vit_attn: the ViT's attention per SDPA backend

def section_vit_attn(args) -> list[dict]:
    """The ViT's non-causal attention at its training shape ([tiles, heads, patches, head_dim], here
    16 heads of 72 at 676 patches for so400m), forward + backward through the SDPA call the model
    makes (models/attention.py: [s, b, n, d] views permuted to [b, n, s, d]), with PyTorch's choice and
    with each backend forced. FLOPs: forward 4 · tiles · heads · patches² · head_dim, backward 2.5 x."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_bluelm.config.vision import VisionConfig

    v = VisionConfig(preset=args.vision)
    v.resolve()
    heads, d = v.num_attention_heads, v.hidden_size // v.num_attention_heads
    patches = (v.image_size // v.patch_size) ** 2
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    backends = {"auto": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if dev == "cpu":
        backends = {"auto": None, "math": SDPBackend.MATH}
    results = []
    for tiles in (int(t) for t in args.vit_attn_tiles.split(",")):
        qkv = torch.randn(patches, tiles, heads, 3, d, device=dev, dtype=dtype, requires_grad=True)
        grad = torch.randn(tiles, heads, patches, d, device=dev, dtype=dtype)
        flops = 3.5 * 4 * tiles * heads * patches**2 * d
        for name, backend in backends.items():
            row = {"variant": f"vit_attn_{name}", "tiles": tiles, "heads": heads, "patches": patches, "head_dim": d}
            try:
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    sec = _timed(partial(_vit_attention_fwd_bwd, qkv, grad), args.warmup, max(args.steps, 3))
                row.update(fwd_bwd_ms=sec * 1e3, tflops=flops / sec / 1e12)
            except RuntimeError as e:  # a backend that does not take this shape says so
                row["error"] = str(e).splitlines()[0][:160]
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def _vit_attention_fwd_bwd(qkv: torch.Tensor, grad: torch.Tensor) -> None:
    import torch.nn.functional as F

    q, k, v = (qkv[..., i, :].permute(1, 2, 0, 3) for i in range(3))  # [b, n, s, d] strided views
    F.scaled_dot_product_attention(q, k, v).backward(grad)


# ------------------------------------------------------------------ text: reset_attention_mask cost

def text_batches(vocab: int, mbs: int, seq: int, doc_mean: int, with_ids: bool, seed: int):
    gen = np.random.RandomState(seed)
    while True:
        x = torch.from_numpy(gen.randint(0, vocab, (mbs, seq + 1)))
        batch = {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(mbs, seq)}
        ids = torch.zeros(mbs, seq, dtype=torch.long)
        for r in range(mbs):
            cuts = np.cumsum(gen.geometric(1.0 / doc_mean, seq))
            cuts = cuts[cuts < seq]
            for c in cuts:
                ids[r, c:] += 1
        starts = torch.cat([torch.ones(mbs, 1, dtype=torch.bool), ids[:, 1:] != ids[:, :-1]], 1)
        pos = torch.arange(seq).expand(mbs, seq)
        first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
        batch["position_ids"] = (pos - first) if with_ids else pos.contiguous()
        batch["document_ids"] = ids if with_ids else None
        yield batch


def release_memory() -> None:
    """Free the previous variant's model and optimizer (~48 GiB at 2.9B) before the next is built: a
    run is a reference cycle, which only the garbage collector frees, so without this the next variant
    ran (and reported its peak memory) with the previous one still allocated."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _text_variant(args, vocab: int, masked: bool) -> dict:
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training.loop import prepare_config, setup_run
    from megatron_bluelm.training.step import train_step

    cfg = load_config(None, ["--model.preset", args.preset, "--data.mock", "true", "--data.seq_length",
                             str(args.seq), "--training.micro_batch_size", str(args.mbs),
                             "--training.global_batch_size", str(args.mbs * args.microbatches),
                             "--training.recompute", args.recompute, "--model.backend", args.backend,
                             "--training.train_steps", "1000", "--schedule.warmup_steps", "1",
                             "--data.reset_attention_mask", str(masked).lower(),
                             "--data.reset_position_ids", str(masked).lower(), "--checkpoint.save", "none"])
    prepare_config(cfg)
    run = setup_run(cfg, partial(build_decoder, cfg, vocab), 0.0)
    try:
        data = [text_batches(vocab, args.mbs, args.seq, args.doc_mean, masked, args.seed)]
        kw = dict(num_microbatches=args.microbatches, seq_length=args.seq, micro_batch_size=args.mbs,
                  device=run.info.device)

        def step():
            train_step(run.model, run.optimizer, run.scheduler, data, **kw)

        sec = _timed(step, args.warmup, args.steps)
        tokens = args.mbs * args.microbatches * args.seq
        return {"variant": "reset_attention_mask" if masked else "unmasked", "step_s": sec,
                "tokens_per_s": tokens / sec}
    finally:
        teardown()


def section_text(args) -> list[dict]:
    from megatron_bluelm.data import load_tokenizer

    vocab = load_tokenizer(BUNDLED_TOKENIZER).vocab_size
    results = []
    for masked in (True, False):
        release_memory()
        results.append(_text_variant(args, vocab, masked))
    results[0]["throughput_vs_unmasked"] = results[0]["tokens_per_s"] / results[1]["tokens_per_s"]
    for r in results:
        print(json.dumps(r), flush=True)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="mm,attn,text", help="sections: mm, attn, text, vit_attn (comma-separated)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vision", default="vit-tiny")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--records", type=int, default=120, help="image-text records (text documents are added)")
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (the loader time shrinks with them)")
    ap.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    ap.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                    help="mm: do not run the ViT at every micro-batch tile count before timing (prewarm_tile_counts);"
                         " the timed steps then include the first-seen counts' one-time cost")
    ap.add_argument("--max-tiles-per-microbatch", type=int, default=None)
    ap.add_argument("--variants", default="packed,unpacked",
                    help="mm section: packed, unpacked (one record per row), packed_unfused_wgrad (packed with "
                         "training.fused_wgrad_accumulation false)")
    ap.add_argument("--attn-seq", type=int, default=32768)
    ap.add_argument("--attn-docs", type=int, default=64)
    ap.add_argument("--vit-attn-tiles", default="16,32", help="vit_attn section: tiles per call (comma-separated)")
    ap.add_argument("--attn-heads", default="20,4", help="query heads, KV heads")
    ap.add_argument("--attn-dim", type=int, default=128)
    ap.add_argument("--doc-mean", type=int, default=1024, help="text section: mean document length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                    help="mm section: also alternate the --ab-variants (AB_VARIANTS: switches on / off) in one "
                         "process, each replaying the same --steps steps' rows, ROUNDS rounds; medians")
    ap.add_argument("--ab-variants", default="all,no_vit_grad_kernels,no_residual_norms,no_deferred_clip",
                    help=f"comma-separated, 'all' among them: {', '.join(AB_VARIANTS)}")
    ap.add_argument("--out", default=None, help="write all results as JSON")
    args = ap.parse_args(argv)
    sections = {"mm": section_mm, "attn": section_attn, "text": section_text, "vit_attn": section_vit_attn}
    results = {}
    for name in args.only.split(","):
        if name not in sections:
            ap.error(f"--only: unknown section {name!r}; choose from {sorted(sections)}")
        print(f"== {name}", flush=True)
        results[name] = sections[name](args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
