"""Where a training step's GPU time goes: text unmasked vs document-masked, and the packed multimodal step.

    # one H200 (full model; about 3 minutes)
    python tools/bench/decoder_profile.py LOGDIR --preset bluelm-2.5-3b --vision vit-so400m --seq 4096
    # the text variants only / the multimodal step only
    python tools/bench/decoder_profile.py LOGDIR --only text     # or --only mm
    # CPU smoke run (tiny model, seconds; only the CPU-side numbers mean anything)
    python tools/bench/decoder_profile.py LOGDIR --preset tiny --vision vit-tiny --seq 256 --records 60 \\
        --microbatches 2 --mm-microbatches 2 --steps 1 --warmup 1

Variants (``--only``), each a few training steps under ``torch.profiler`` after warm-up steps:

text_unmasked     text pretraining batches (multimodal_bench.text_batches), plain causal attention
text_masked       the same with document ids (data.reset_attention_mask / reset_position_ids): the
                  attention path bluelm_kernels/attention.py picks (varlen flash on CUDA for sorted ids)
text_masked_flex  the same, FlexAttention forced (the path before varlen), for a same-run comparison
text_masked_single  (only by name) document ids of one document per row: the masked path's ids, layout
                  and per-token RoPE, with the unmasked path's attention kernel (plumbing vs kernels)
mm_packed         the packed multimodal step (multimodal_bench's record distribution)
mm_vit            the ViT + adapter forward + backward alone on the same micro-batches' tiles

Per variant, per micro-batch, in ms: wall time (CUDA-synchronized), GPU kernel time by category
(attention | matmul | norm+elementwise | optimizer | copy/memset | other), GPU idle (= wall - busy:
launch gaps and host syncs), host time spent computing document layouts / block masks and the kernels
that run inside them, the attention paths taken (bluelm_kernels.attention.PATHS), the top kernels, and the
allocator's retries and peak allocated / reserved memory. Then
``mm_decoder_side`` = mm_packed - mm_vit (the decoder + splice + loss + optimizer share of the
multimodal step), to compare with text_masked; ``vit_forward_ms`` (CUDA events around the ViT's
forward) inside the step vs alone shows whether the ViT itself runs slower within the step.
Everything is printed and written to LOGDIR (profile.log, profile.json; chrome traces with --traces).

What the host issues, per micro-batch: ``wall_unprofiled_ms`` (the same steps run once more without the
profiler, whose per-op cost inflates host-bound time), ``aten_ops`` (torch operator calls, nested ones
included), ``launches`` (CUDA kernel launches) and ``pageable_copy_ms`` (device time of host-to-device
copies from pageable memory: each makes the host wait for the stream; 0 when the batches are pinned).
On CPU the op counts are the same Python as on CUDA, minus the kernels (a host-overhead comparison).

``--sync-debug``: the profiled steps also run under ``torch.cuda.set_sync_debug_mode("warn")``; every
operation that makes the host wait for the device (``.item()``, ``.cpu()``, ``nonzero``, a copy from
pageable memory, ...) is counted by its call site (the innermost frames in this project or in
megatron-core), printed per variant as ``sync_sites`` (per micro-batch). An idle GPU between kernels
is either such a wait or the host launching kernels slower than they run; this separates the two.

``--host-lead`` (mm): one more step with a CUDA event and a host timestamp at every ViT and decoder
layer's forward and backward: how much queued work the device still had at each point
(``lead_<phase>_ms``: min / median / points at ~0) and the time it spent waiting on the host
(``host_paced_ms``, per phase). Leads near zero throughout mean the step runs at the host's pace.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from functools import partial

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import multimodal_bench as mmb  # noqa: E402

CATEGORIES = ("attention", "matmul", "norm+elementwise", "optimizer", "copy/memset", "other")
_RULES = (  # first match wins; kernel names as CUDA / Triton / cuBLAS report them, lower case
    ("attention", ("flash", "fmha", "attention", "attn", "flex", "triton_tem", "cudnn_sdpa", "sdpa")),
    ("optimizer", ("multi_tensor", "adam", "foreach", "l2norm")),
    ("matmul", ("gemm", "xmma", "nvjet", "cublas", "cutlass", "wgmma", "splitk", "matmul", "conv")),
    ("copy/memset", ("memcpy", "memset")),
    ("norm+elementwise", ("norm", "elementwise", "rope", "swiglu", "gelu", "silu", "softmax", "reduce",
                          "cross_entropy", "copy", "triton_", "cat", "index", "scatter", "gather", "fill")),
)


# CUDA runtime / driver calls that put a kernel on the stream (the profiler's CPU-side events)
LAUNCHES = frozenset(("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                      "cudaLaunchCooperativeKernel"))


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in _RULES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _attention_module():
    import bluelm_kernels.attention  # noqa: F401  (the package re-exports the function under the module's name)

    return sys.modules["bluelm_kernels.attention"]


class MaskTimer:
    """Wraps bluelm_kernels.attention's layout / block-mask builders: host seconds and a profiler range."""

    def __init__(self):
        ka = _attention_module()
        self.ka, self.seconds, self.calls = ka, 0.0, 0
        self.saved = {n: getattr(ka, n) for n in ("document_layout", "document_block_mask")}

    def __enter__(self):
        for name, fn in self.saved.items():
            setattr(self.ka, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            with torch.profiler.record_function("mask_build"):
                out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        return timed

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.ka, name, fn)


@contextlib.contextmanager
def forced_flex():
    ka = _attention_module()
    saved = ka.varlen_usable
    ka.varlen_usable = lambda q, k: False
    try:
        yield
    finally:
        ka.varlen_usable = saved


class SyncSites:
    """Counts the host-device synchronisations of the enclosed code by call site (CUDA only)."""

    OURS = (f"{os.sep}megatron_bluelm{os.sep}", f"{os.sep}bluelm_kernels{os.sep}", f"{os.sep}megatron{os.sep}core",
            f"{os.sep}tools{os.sep}bench{os.sep}")

    def __init__(self, enabled: bool):
        self.enabled = enabled and torch.cuda.is_available()
        self.sites = collections.Counter()

    def __enter__(self):
        if self.enabled:
            self._catch = warnings.catch_warnings()
            self._catch.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if any(k in f.filename for k in self.OURS)]
        site = " < ".join(f"{f.filename.split(os.sep + 'main' + os.sep)[-1]}:{f.lineno}" for f in frames[::-1][:3])
        self.sites[site or f"{filename}:{lineno}"] += 1

    def __exit__(self, *exc):
        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(*exc)

    def per_micro_batch(self, n: int) -> list:
        return [(site, round(count / n, 2)) for site, count in self.sites.most_common(15)]


def kernels_by_op(events, n: int, top: int) -> list:
    """GPU time per (autograd node, launching torch op, kernel) per micro-batch, largest first: which op
    a kernel comes from (a copy kernel's name alone does not say), and in the backward which autograd
    function ran it (``SplitBackward0`` -> ``aten::cat`` -> a concatenation kernel)."""
    acc = collections.Counter()
    for evt in events:
        ks = getattr(evt, "kernels", None)
        if not ks:
            continue
        node, up = "forward", evt.cpu_parent
        while up is not None:
            if up.name.startswith("autograd::engine::evaluate_function: "):
                node = up.name.split(": ", 1)[1]
                break
            up = up.cpu_parent
        for k in ks:
            acc[(node, evt.name, k.name[:120])] += k.duration / 1e3  # us -> ms
    return [(f"{node} | {op} | {kernel}", round(ms / n, 3)) for (node, op, kernel), ms in acc.most_common(top)]


def profile_steps(step_fn, steps: int, microbatches: int, name: str, logdir: str, traces: bool,
                  sync_debug: bool = False, on_start=None, top: int = 8, kernel_ops: int = 0) -> dict:
    """Run ``step_fn`` ``steps`` times without, then ``steps`` times under the profiler; per-micro-batch
    figures (module docstring). ``on_start()``: called between the two (counters to reset)."""
    from bluelm_kernels.attention import PATHS

    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    PATHS.clear()
    cuda = torch.cuda.is_available()
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0
    t0 = mmb._now()  # the same steps without the profiler, whose per-op cost inflates host-bound time
    for _ in range(steps):
        step_fn()
    unprofiled = mmb._now() - t0
    if on_start is not None:
        on_start()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with MaskTimer() as masks, SyncSites(sync_debug) as syncs, torch.profiler.profile(activities=acts) as prof:
        t0 = mmb._now()
        for _ in range(steps):
            step_fn()
        wall = mmb._now() - t0
    n = steps * microbatches
    by_cat, kernels, mask_dev = collections.Counter(), collections.Counter(), 0.0
    host = collections.Counter()  # what the host issues per step: torch ops, kernel launches, pageable copies
    for evt in prof.key_averages():
        if evt.key == "mask_build":
            mask_dev += evt.device_time_total / 1e3
        if evt.key.startswith("aten::"):
            host["ops"] += evt.count
        elif evt.key in LAUNCHES:
            host["launches"] += evt.count
        if "Pageable" in evt.key and str(evt.device_type).endswith("CUDA"):
            host["pageable_copy_ms"] += evt.self_device_time_total / 1e3
        # a record_function range (``Optimizer.step#AdamW.step``) also appears as a CUDA event spanning
        # the kernels inside it: counting it would count those kernels twice (torch's own table skips it)
        if (str(evt.device_type).endswith("CUDA") and evt.self_device_time_total > 0
                and not getattr(evt, "is_user_annotation", False)):
            ms = evt.self_device_time_total / 1e3
            by_cat[category(evt.key)] += ms
            kernels[evt.key] += ms
    if traces:
        prof.export_chrome_trace(os.path.join(logdir, f"trace_{name}.json"))
    busy = sum(by_cat.values())
    return {"variant": name, "micro_batches": n, "wall_ms": wall * 1e3 / n, "gpu_busy_ms": busy / n,
            "gpu_idle_ms": (wall * 1e3 - busy) / n, **{c: by_cat[c] / n for c in CATEGORIES},
            "mask_build_host_ms": masks.seconds * 1e3 / n, "mask_build_kernels_ms": mask_dev / n,
            "mask_builds": masks.calls, "attention_paths": dict(PATHS),
            "wall_unprofiled_ms": unprofiled * 1e3 / n, "aten_ops": host["ops"] / n, "launches": host["launches"] / n,
            "pageable_copy_ms": host["pageable_copy_ms"] / n,
            "top_kernels": [(k[:90], round(v / n, 3)) for k, v in kernels.most_common(top)],
            **({"kernels_by_op": kernels_by_op(prof.events(), n, kernel_ops)} if kernel_ops else {}),
            # the caching allocator freeing and retrying (fragmentation near the memory limit) stalls the step
            "alloc_retries": (torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries) if cuda else 0,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
            **({"sync_sites": syncs.per_micro_batch(n)} if syncs.enabled else {})}


# ------------------------------------------------------------------ text

def text_variant(args, masked: bool, flex: bool, logdir: str, single: bool = False) -> dict:
    """``single``: rows of one document each (document ids, layout and per-token RoPE as when masked,
    the attention plain SDPA as when unmasked): the masked path's plumbing without its kernels."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training.loop import prepare_config, setup_run
    from megatron_bluelm.training.step import train_step

    vocab = load_tokenizer(mmb.BUNDLED_TOKENIZER).vocab_size
    flag = str(masked).lower()
    cfg = load_config(None, ["--model.preset", args.preset, "--data.mock", "true", "--data.seq_length",
                             str(args.seq), "--training.micro_batch_size", "1",
                             "--training.global_batch_size", str(args.microbatches),
                             "--training.recompute", "none", "--model.backend", args.backend,
                             "--training.train_steps", "1000", "--schedule.warmup_steps", "1",
                             "--data.reset_attention_mask", flag, "--data.reset_position_ids", flag,
                             "--checkpoint.save", "none"])
    prepare_config(cfg)
    run = setup_run(cfg, partial(build_decoder, cfg, vocab), 0.0)
    try:
        doc_mean = 1000 * args.seq if single else args.doc_mean  # the first cut falls past the row's end
        data = [mmb.text_batches(vocab, 1, args.seq, doc_mean, masked, args.seed)]
        kw = dict(num_microbatches=args.microbatches, seq_length=args.seq, micro_batch_size=1,
                  device=run.info.device)

        def step():
            train_step(run.model, run.optimizer, run.scheduler, data, **kw)

        name = "text_masked_flex" if flex else ("text_masked" if masked else "text_unmasked")
        name += "_single" if single else ""
        with forced_flex() if flex else contextlib.nullcontext():
            for _ in range(args.warmup):
                step()
            return profile_steps(step, args.steps, args.microbatches, name, logdir, args.traces, args.sync_debug,
                                 top=args.top_kernels, kernel_ops=args.kernel_ops)
    finally:
        teardown()


# ------------------------------------------------------------------ multimodal

def mm_variants(args, logdir: str) -> list[dict]:
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.config.presets import apply_preset
    from megatron_bluelm.data import build_data_iterator, load_tokenizer
    from megatron_bluelm.data.mm_packing import build_packed_multimodal_datasets
    from megatron_bluelm.data.multimodal_dataset import collate
    from megatron_bluelm.models.multimodal import build_vlm
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.stages.multimodal import multimodal_config
    from megatron_bluelm.training.loop import setup_run
    from megatron_bluelm.training.step import train_step

    tok = load_tokenizer(mmb.BUNDLED_TOKENIZER)
    mbs, rows = args.mm_microbatches, args.mm_mbs
    with tempfile.TemporaryDirectory() as out:
        base = ["--model.preset", args.preset, "--vision.preset", args.vision, "--vision.max_tiles", "6",
                "--data.seq_length", str(args.seq), "--data.split", "1,0,0", "--training.micro_batch_size", str(rows),
                "--training.global_batch_size", str(rows * mbs),
                "--training.train_steps", str(args.warmup + 2 * args.steps + 2),
                "--training.eval_interval", "0", "--schedule.warmup_steps", "1", "--training.recompute", "none",
                "--logging.output_dir", os.path.join(out, "log"), "--logging.tensorboard", "false",
                "--checkpoint.save", "none", "--model.backend", args.backend, "--vision.pack", "true"]
        cfg = load_config(None, base)
        cfg.vision.resolve()
        mm = mmb.make_records(out, args.records, cfg.vision.image_size, args.seed)
        mix = mmb.mixture_for_text_share(out, mm, mmb.text_prefix(out), cfg, 0.4)
        cfg = multimodal_config(load_config(None, base + ["--data.mixture", mix]))
        apply_preset(cfg.model)
        vocab = cfg.model.vocab_size or tok.vocab_size
        samples = rows * mbs * (args.warmup + 2 * args.steps + 2)  # + 2: --host-lead's and --cprofile's
        packed = build_packed_multimodal_datasets(cfg, tok, num_samples=(samples, 0, 0), seed=args.seed)[0]
        run = setup_run(cfg, partial(build_vlm, cfg, vocab, tok.special_ids["<image>"]), 0.0)
        try:
            it = mmb._Timed(build_data_iterator(packed, micro_batch_size=rows, consumed_samples=0, dp_rank=0,
                                                dp_size=1, num_workers=args.workers, collate_fn=collate))
            kw = dict(num_microbatches=mbs, seq_length=args.seq, micro_batch_size=rows, device=run.info.device)

            def step():
                train_step(run.model, run.optimizer, run.scheduler, [it], **kw)

            for _ in range(args.warmup):
                step()
            if args.prewarm:  # every tile count met once, as in a long run (multimodal_bench.prewarm_tile_counts)
                from megatron_bluelm.data.mm_packing import tiles_per_row

                print(f"prewarm: {mmb.prewarm_tile_counts(run.model, cfg, tiles_per_row(cfg) * rows)}", flush=True)
            if args.gc == "manual":  # what a training loop with manual collection sees between its collections
                gc.collect()
                gc.freeze()
                gc.disable()
            it.seen = []
            vlm = mmb._vlm(run.model)
            clock = ForwardClock(vlm.vision_model)
            step_row = profile_steps(step, args.steps, mbs, "mm_packed", logdir, args.traces, args.sync_debug,
                                     top=args.top_kernels, kernel_ops=args.kernel_ops,
                                     on_start=lambda: (clock.take_ms(), it.seen.clear()))
            seen = list(it.seen)
            step_row["tiles_per_micro_batch"] = sum(int(b["pixel_values"].shape[0]) for b in seen) / len(seen)
            step_row["vit_forward_ms"] = clock.take_ms() / len(seen)

            def vit():
                mmb._vit_adapter_seconds(run.model, seen)

            vit()  # the same shapes once more outside the profile (allocator, lazy init)
            clock.take_ms()
            # profile_steps counts len(seen) micro-batches for one call: the same unit as step_row
            vit_row = profile_steps(vit, 1, len(seen), "mm_vit", logdir, args.traces, args.sync_debug,
                                    top=args.top_kernels, kernel_ops=args.kernel_ops,
                                    on_start=clock.take_ms)
            vit_row["vit_forward_ms"] = clock.take_ms() / len(seen)
            clock.remove()
            if args.host_lead and torch.cuda.is_available():
                lead = HostLead(vlm)
                step_row["host_lead"] = lead.run(step, it, os.path.join(logdir, "host_lead_points.json"))
                lead.remove()
            if args.cprofile:
                step_row["cprofile"] = host_profile(step, args.cprofile, os.path.join(logdir, "cprofile_step.txt"))
            gc.enable()
            return [step_row, vit_row]
        finally:
            teardown()


def host_profile(step_fn, top: int, path: str) -> list:
    """One ``step_fn()`` under cProfile (the host's Python; inflated by cProfile's own per-call cost,
    so read the shares, not the totals); the ``top`` functions by own time to ``path`` and returned."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    step_fn()
    prof.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).sort_stats("tottime")
    stats.print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    with open(path, "w") as f:
        f.write(buf.getvalue())
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [(f"{os.path.basename(fn)}:{line}:{name}", calls, round(tt * 1e3, 1))
            for (fn, line, name), (_, calls, tt, _, _) in rows]


class HostLead:
    """How far the host runs ahead of the device inside one step (CUDA only). A CUDA event is recorded,
    with the host clock, at every ViT / decoder layer's forward and backward (the gradient hook on a
    layer's input fires once its backward has been queued). The *lead*
    at a point is (device time the event executed) - (host time it was recorded), both from a
    synchronized origin: the milliseconds of queued work the device still had. A lead near zero means
    the device had caught up with the host there and waited for its next launch; a segment between
    two such points ran at the host's pace (``host_paced_ms``)."""

    EPS_MS = 0.05

    def __init__(self, vlm):
        self.points, self.handles, self.armed = [], [], False
        for name, module in (("vit", vlm.vision_model), ("adapter", vlm.adapter), ("lm", vlm.language_model)):
            self.handles.append(module.register_forward_pre_hook(partial(self._at, f"{name}_start")))
            self.handles.append(module.register_forward_hook(partial(self._at, f"{name}_end")))
        stacks = (("vit", vlm.vision_model.decoder.layers), ("dec", vlm.language_model.decoder.layers))
        for tag, layers in stacks:
            for i, layer in enumerate(layers):
                self.handles.append(layer.register_forward_pre_hook(partial(self._pre, f"{tag}_fwd", f"{tag}_bwd", i),
                                                                    with_kwargs=True))

    def _pre(self, fwd, bwd, index, module, args, kwargs):
        if not self.armed:
            return
        self.mark(fwd, index)
        x = kwargs.get("hidden_states", args[0] if args else None)
        if torch.is_tensor(x) and x.requires_grad:
            x.register_hook(lambda grad: (self.mark(bwd, index), None)[1])

    def _at(self, phase, module, *unused):
        if self.armed:
            self.mark(phase)

    def mark(self, phase: str, index: int = 0) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.points.append((phase, index, time.perf_counter(), ev))

    def run(self, step_fn, timed=None, dump: str = None) -> dict:
        """One ``step_fn()``; ``timed``: the step's ``multimodal_bench._Timed`` iterator (batch fetches
        marked too); ``dump``: a JSON file for every point (phase, index, host ms, device ms)."""
        torch.cuda.synchronize()
        self.points, self.armed = [], True
        inner = None
        if timed is not None:
            inner = timed.it
            timed.it = self._fetches(inner)
        self.mark("start")
        try:
            step_fn()
        finally:
            self.armed = False
            if inner is not None:
                timed.it = inner
        torch.cuda.synchronize()
        _, _, h0, e0 = self.points[0]
        rows = [(phase, i, (h - h0) * 1e3, e0.elapsed_time(ev)) for phase, i, h, ev in self.points]
        by_phase = collections.defaultdict(list)
        paced = collections.Counter()
        for (_, _, h_a, g_a), (phase, _, h_b, g_b) in zip(rows, rows[1:]):
            lead_a, lead_b = g_a - h_a, g_b - h_b
            by_phase[phase].append(lead_b)
            if lead_a <= self.EPS_MS and lead_b <= self.EPS_MS:
                paced[phase] += h_b - h_a  # the device waited on the host over this whole segment
        if dump:
            with open(dump, "w") as f:
                json.dump([(p, i, round(h, 3), round(g, 3)) for p, i, h, g in rows], f)
        wall = rows[-1][3]
        out = {"step_device_ms": wall, "step_host_issue_ms": rows[-1][2], "host_paced_ms": dict(paced),
               "host_paced_total_ms": sum(paced.values())}
        for phase, leads in by_phase.items():
            leads = sorted(leads)
            out[f"lead_{phase}_ms"] = {"min": round(leads[0], 2), "median": round(leads[len(leads) // 2], 2),
                                       "at_or_below_eps": sum(v <= self.EPS_MS for v in leads), "points": len(leads)}
        return out

    def _fetches(self, it):
        while True:
            self.mark("fetch_start")
            batch = next(it, None)
            tiles = batch.get("pixel_values") if isinstance(batch, dict) else None
            self.mark("fetch_end", -1 if tiles is None else int(tiles.shape[0]))
            if batch is None:
                return
            yield batch

    def remove(self):
        for h in self.handles:
            h.remove()


class ForwardClock:
    """CUDA-event time of a module's forward passes (pre / post hooks), to compare the ViT's forward
    inside the step with the same forward run alone."""

    def __init__(self, module):
        self.pairs, self.handles = [], []
        if torch.cuda.is_available():
            self.handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _start(self, module, args):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.pairs.append([ev, None])

    def _stop(self, module, args, out):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.pairs[-1][1] = ev

    def take_ms(self) -> float:
        """Sum of the forwards since the last call (synchronizes)."""
        if not self.pairs:
            return 0.0
        torch.cuda.synchronize()
        total = sum(a.elapsed_time(b) for a, b in self.pairs if b is not None)
        self.pairs = []
        return total

    def remove(self):
        for h in self.handles:
            h.remove()


TABLE_KEYS = ("wall_ms", "wall_unprofiled_ms", "gpu_busy_ms", "gpu_idle_ms", *CATEGORIES, "pageable_copy_ms",
              "mask_build_host_ms", "mask_build_kernels_ms", "vit_forward_ms", "aten_ops", "launches")


def difference(a: dict, b: dict, name: str) -> dict:
    return {"variant": name, **{k: a[k] - b[k] for k in TABLE_KEYS}}


def table(rows: list[dict]) -> str:
    head = f"{'ms per micro-batch':22s}" + "".join(f"{r['variant'][:17]:>18s}" for r in rows)
    lines = [head]
    for k in TABLE_KEYS:
        lines.append(f"{k:22s}" + "".join(f"{r.get(k, float('nan')):18.2f}" for r in rows))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logdir")
    ap.add_argument("--only", default="text,mm", help="text (the three text variants) or one of text_unmasked, "
                    "text_masked, text_masked_flex, text_masked_single; mm (the multimodal step)")
    ap.add_argument("--preset", default="bluelm-2.5-3b")
    ap.add_argument("--vision", default="vit-so400m")
    ap.add_argument("--backend", default="fused")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--microbatches", type=int, default=4, help="text variants")
    ap.add_argument("--mm-microbatches", type=int, default=8)
    ap.add_argument("--mm-mbs", type=int, default=1, help="mm variant: rows per micro-batch")
    ap.add_argument("--top-kernels", type=int, default=8, help="kernels listed per variant, by GPU time")
    ap.add_argument("--kernel-ops", type=int, default=0,
                    help="also list this many (autograd node | torch op | kernel) triples per variant, by GPU time")
    ap.add_argument("--records", type=int, default=400, help="image-text records for the mm variant")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="steps before the profile (compilation happens there)")
    ap.add_argument("--doc-mean", type=int, default=1024, help="text variants: mean document length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traces", action="store_true", help="also write a chrome trace per variant")
    ap.add_argument("--sync-debug", action="store_true", help="count host-device synchronisations by call site")
    ap.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                    help="mm: skip the ViT's run at every micro-batch tile count before the profile")
    ap.add_argument("--gc", choices=("auto", "manual"), default="auto",
                    help="manual: Python's garbage collector frozen and off after the warm-up (as a loop collecting "
                         "between steps); auto: Python's default")
    ap.add_argument("--cprofile", type=int, default=0, help="mm: one more step under cProfile; this many functions")
    ap.add_argument("--host-lead", action="store_true",
                    help="mm: one more step measuring how far the host runs ahead of the device (HostLead)")
    args = ap.parse_args(argv)
    os.makedirs(args.logdir, exist_ok=True)
    log = open(os.path.join(args.logdir, "profile.log"), "a")

    def say(text):
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    rows = []
    for part in args.only.split(","):
        text = {"text": ((False, False), (True, False), (True, True)), "text_unmasked": ((False, False),),
                "text_masked": ((True, False),), "text_masked_flex": ((True, True),),
                "text_masked_single": ((True, False),)}
        if part in text:
            for masked, flex in text[part]:
                rows.append(text_variant(args, masked, flex, args.logdir, single=part == "text_masked_single"))
                say(json.dumps(rows[-1]))
                mmb.release_memory()
        elif part == "mm":
            step_row, vit_row = mm_variants(args, args.logdir)
            mmb.release_memory()
            rows += [step_row, vit_row, difference(step_row, vit_row, "mm_decoder_side")]
            for r in rows[-3:]:
                say(json.dumps(r))
        else:
            ap.error(f"--only: unknown part {part!r}; choose from {', '.join(text)}, mm")
    say(table(rows))
    with open(os.path.join(args.logdir, "profile.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
