"""Check (bf16) and time the kernels against torch eager, torch.compile and Liger-Kernel.

    python -m bluelm_kernels.bench.bench_kernels            # on a CUDA machine; JSON under $OUT or ./
    TRITON_INTERPRET=1 python -m bluelm_kernels.bench.bench_kernels --smoke   # CPU: tiny shapes, no timing claims

Shapes are the bluelm-2.5-3b decoder's (hidden 2560, 20 heads, 4 KV groups, head dim 128,
FFN 6912, vocab 100352), 8192 tokens (4096 for the loss). Per op and implementation it reports
forward and backward GPU time, the fewest bytes the op must move, GB/s and % of a measured
device-to-device copy. The fused linear-CE also reports the peak memory of one loss
forward+backward.

Timing of the elementwise/norm ops (`gpu_ms`): the GPU is first held by `torch.cuda._sleep`
while the host queues many back-to-back calls, then CUDA events around those calls give the GPU
time per call without the host's launch overhead (Python, autograd, Triton launcher), which in
training overlaps with earlier GPU work. Calls rotate over input sets of >= 3x the L2 size, so
inputs come from HBM, not L2. Upstream gradients are made in bf16 before timing (converting
them inside the timed region added a full fp32 read + bf16 write to every backward).
Why not CUDA graphs: see `graph_probe` (capturing `autograd.grad` of a graph recorded on the
default stream fails; the failed capture then poisons the CUDA context).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from bluelm_kernels import (
    apply_rope,
    apply_rope_qk,
    apply_rope_qk_,
    apply_rope_ref,
    attention,
    attention_ref,
    fused_linear_cross_entropy,
    rmsnorm,
    rmsnorm_ref,
    swiglu,
    swiglu_ref,
)
from bluelm_kernels.attention import document_mask

RESULTS = {"env": {}, "ops": [], "checks": [], "memory": []}


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------- timing helpers


def bench_ms(fn, grad_to_none=None):
    if not torch.cuda.is_available():  # smoke mode: one timed call, numbers meaningless
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                   return_mode="median")


_CYCLES_PER_MS = []


def _sleep_cycles_per_ms():
    if not _CYCLES_PER_MS:
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        torch.cuda._sleep(20_000_000)
        e1.record()
        e1.synchronize()
        _CYCLES_PER_MS.append(20_000_000 / e0.elapsed_time(e1))
    return _CYCLES_PER_MS[0]


def gpu_ms(call, n_sets, reps=7, target_ms=2.0):
    """GPU time of call(i) (i cycles over n_sets input sets), host launch overhead excluded.

    The stream is held by a spin kernel long enough for the host to queue all calls of one
    repetition; events bracket the queued calls, so the interval is the GPU's back-to-back
    execution (kernel gaps included). Returns (median ms per call, host ms per call, starved):
    starved is True when the host needed longer to queue than the spin + GPU time, i.e. the
    number may still contain host time."""
    if not torch.cuda.is_available():  # smoke mode: one timed call, numbers meaningless
        t = time.perf_counter()
        call(0)
        return (time.perf_counter() - t) * 1e3, 0.0, False
    for i in range(n_sets):  # warm-up: compilation, autotuning, allocator
        call(i)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    e0.record()
    for i in range(2 * n_sets):
        call(i % n_sets)
    e1.record()
    host = (time.perf_counter() - t) * 1e3 / (2 * n_sets)
    e1.synchronize()
    est = e0.elapsed_time(e1) / (2 * n_sets)
    iters = n_sets * max(2, min(400 // n_sets, round(target_ms / max(est, 1e-3) / n_sets)))
    cyc = _sleep_cycles_per_ms()
    times, starved = [], False
    for _ in range(reps):
        sleep_ms = 1.5 * host * iters + 0.5
        torch.cuda._sleep(int(sleep_ms * cyc))
        t = time.perf_counter()
        e0.record()
        for j in range(iters):
            call(j % n_sets)
        e1.record()
        queued = (time.perf_counter() - t) * 1e3
        e1.synchronize()
        ms = e0.elapsed_time(e1)
        starved |= queued > sleep_ms + ms
        host = max(host, queued / iters)
        times.append(ms / iters)
    times.sort()
    return times[len(times) // 2], host, starved


def n_sets_for(nbytes):
    """Input sets to rotate over so that one pass over them moves >= 3x the L2 size."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if torch.cuda.is_available() else 0
    return max(2, min(8, -(-3 * l2 // max(nbytes, 1))))


def copy_bandwidth(dev):
    n = 2**29 if dev == "cuda" else 2**20  # 1 GiB of bf16
    src = torch.randn(n, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    gbs = 2 * src.numel() * 2 / ms / 1e6  # GB/s, bytes read + written
    if dev == "cuda":  # the same copy at the elementwise ops' size (84 MB moved), GPU time
        srcs = [torch.randn(8192 * 2560, device=dev, dtype=torch.bfloat16) for _ in range(4)]
        dsts = [torch.empty_like(x) for x in srcs]
        ms_small = gpu_ms(lambda i: dsts[i].copy_(srcs[i]), 4)[0]
        RESULTS["env"]["copy_gbs_84MB"] = 2 * srcs[0].numel() * 2 / ms_small / 1e6
    return gbs


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def poison_allocator(dev):
    """Fill free cached blocks with NaN so an output element nobody writes cannot pass a check."""
    if dev == "cuda":
        free = torch.cuda.mem_get_info()[0]
        big = torch.full((min(free // 4, 2**30),), float("nan"), device=dev, dtype=torch.float32)
        del big


def record_check(op, impl, name, err, tol):
    ok = bool(err < tol)  # NaN compares False: fails
    RESULTS["checks"].append({"op": op, "impl": impl, "tensor": name, "rel_err": err, "tol": tol, "ok": ok})
    if not ok:
        log(f"CHECK FAILED {op}/{impl}/{name}: rel err {err:.3e} (tol {tol})")


# ---------------------------------------------------------------- generic op benchmark


def run_op(op, impls, make_inputs, ref32, fwd_bytes, bwd_bytes, copy_gbs, tol=2e-2,
           extra_fwd=None):
    """impls: {name: fn(*inputs) -> tensor | tuple}. Inputs: bf16 leaves (float ones need grad).

    Each impl is checked against ref32 on fp32 copies of fresh inputs (outputs and the grads of
    every float input under the same random upstream grads; allocator poisoned with NaN), then
    its forward and backward are timed with gpu_ms on rotating input sets.
    extra_fwd: {name: fn(*inputs)} timed forward only (e.g. an in-place launch)."""
    inputs = make_inputs()
    leaves32 = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    outs32 = _as_tuple(ref32(*leaves32))
    ups = [torch.randn_like(o).to(inputs[0].dtype).float() for o in outs32]
    want = torch.autograd.grad(outs32, [t for t in leaves32 if t.requires_grad], ups)
    ups16 = [u.to(inputs[0].dtype) for u in ups]
    outs32 = [o.detach() for o in outs32]
    del leaves32
    n = n_sets_for(fwd_bytes)
    sets = [make_inputs() for _ in range(n)]
    set_ups = [[torch.randn_like(u) for u in ups16] for _ in range(n)]
    req = [[t for t in x if t.requires_grad] for x in sets]
    def check(name, fn, when=""):
        poison_allocator(inputs[0].device.type)
        outs = _as_tuple(fn(*inputs))
        grads = torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], ups16)
        for i, (o, w) in enumerate(zip(outs, outs32)):
            record_check(op, name, f"out{i}{when}", rel_err(o, w), tol)
        for i, (g, w) in enumerate(zip(grads, want)):
            record_check(op, name, f"grad{i}{when}", rel_err(g, w), tol)

    for name, fn in impls.items():
        try:
            check(name, fn)
            fwd = gpu_ms(lambda i, fn=fn: fn(*sets[i]), n)
            souts = [_as_tuple(fn(*x)) for x in sets]
            bwd = gpu_ms(lambda i, souts=souts: torch.autograd.grad(
                souts[i], req[i], set_ups[i], retain_graph=True), n)
            del souts
            # Again after thousands of timed calls: catches state a kernel carries between
            # calls (the RMSNorm backward's reused dW workspace must be left zeroed).
            check(name, fn, " after timing")
        except Exception as e:  # noqa: BLE001  # keep going: one broken baseline must not lose the rest
            log(f"{op}/{name} failed: {type(e).__name__}: {e}")
            continue
        for phase, t, nbytes in (("fwd", fwd, fwd_bytes), ("bwd", bwd, bwd_bytes)):
            _record(op, name, phase, t, nbytes, copy_gbs)
        log(f"{op:<16} {name:<8} fwd {fwd[0]:8.4f} ms  bwd {bwd[0]:8.4f} ms  "
            f"(host {fwd[1]:.3f} / {bwd[1]:.3f} ms per call)")
    for name, fn in (extra_fwd or {}).items():
        with torch.no_grad():
            t = gpu_ms(lambda i, fn=fn: fn(*sets[i]), n)
        _record(op, name, "fwd", t, fwd_bytes, copy_gbs)
        log(f"{op:<16} {name:<8} fwd {t[0]:8.4f} ms")


def _record(op, name, phase, t, nbytes, copy_gbs):
    ms, host, starved = t
    gbs = nbytes / ms / 1e6
    RESULTS["ops"].append({"op": op, "impl": name, "phase": phase, "ms": ms, "bytes": nbytes,
                           "gbs": gbs, "pct_copy": 100 * gbs / copy_gbs, "host_ms": host,
                           "starved": starved})


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def compiled(fn):
    if not torch.cuda.is_available():
        return fn
    # The backward is called repeatedly on one graph (retain_graph=True), which donated
    # buffers forbid.
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    return torch.compile(fn, dynamic=False)


def liger():
    try:
        import liger_kernel  # noqa: F401

        return True
    except ImportError:
        return False


# ---------------------------------------------------------------- per-op cases


def _only(impls, tag):
    """Sweep mode: keep our implementation only, named by its launch shape."""
    return {f"ours[{tag}]": impls["ours"]} if tag else impls


def bench_rmsnorm(dev, m, h, copy_gbs, residual, only_ours=""):
    def make():
        x = torch.randn(m, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.rand(h, device=dev) + 0.5).to(torch.bfloat16).requires_grad_()
        if residual:
            r = torch.randn(m, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
            return [x, w, r]
        return [x, w]

    if residual:
        impls = {"ours": lambda x, w, r: rmsnorm(x, w, residual=r),
                 "eager": lambda x, w, r: rmsnorm_ref(x, w, residual=r),
                 "compile": compiled(lambda x, w, r: rmsnorm_ref(x, w, residual=r))}
        nb_f, nb_b = 4 * m * h * 2, 4 * m * h * 2  # fwd: x, r -> y, s; bwd: s, dy, ds -> dx
    else:
        impls = {"ours": rmsnorm, "eager": rmsnorm_ref, "compile": compiled(rmsnorm_ref)}
        nb_f, nb_b = 2 * m * h * 2, 3 * m * h * 2  # fwd: x -> y; bwd: x, dy -> dx
        if liger():
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            impls["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama",
                                                                      False)
    run_op("rmsnorm+res" if residual else "rmsnorm", _only(impls, only_ours), make,
           lambda *a: rmsnorm_ref(a[0], a[1], residual=a[2] if residual else None),
           nb_f, nb_b, copy_gbs)


def bench_swiglu(dev, m, f, copy_gbs, only_ours=""):
    def make():
        return [torch.randn(m, 2 * f, device=dev, dtype=torch.bfloat16, requires_grad=True)]

    impls = {"ours": swiglu, "eager": swiglu_ref, "compile": compiled(swiglu_ref)}
    if liger():
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        impls["liger"] = lambda x: LigerSiLUMulFunction.apply(*torch.chunk(x, 2, dim=-1))
    # fwd: read 2F, write F; bwd: read 2F + F, write 2F
    run_op("swiglu", _only(impls, only_ours), make, swiglu_ref, 3 * m * f * 2, 5 * m * f * 2, copy_gbs)


def bench_rope(dev, s, b, nq, nkv, d, copy_gbs, only_ours=""):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev).float() / d))
    fr = torch.arange(s, device=dev).float()[:, None] * inv
    freqs = torch.cat([fr, fr], -1)[:, None, None, :]

    def make():
        return [torch.randn(s, b, nq, d, device=dev, dtype=torch.bfloat16, requires_grad=True),
                torch.randn(s, b, nkv, d, device=dev, dtype=torch.bfloat16, requires_grad=True)]

    def ours(q, k):  # in place on fresh non-leaf copies; the clones are timed too (see note)
        return apply_rope_qk_(q.clone(), k.clone(), freqs)

    def ref(q, k):
        return apply_rope_ref(q, freqs), apply_rope_ref(k, freqs)

    def ours_model(q, k):  # the fused backend's path: q and k into new tensors, one launch
        return apply_rope_qk(q, k, freqs)

    def ours_each(q, k):  # one launch per tensor (the single-tensor op)
        return apply_rope(q, freqs), apply_rope(k, freqs)

    impls = {"ours": ours, "ours_model": ours_model, "ours_each": ours_each, "eager": ref,
             "compile": compiled(ref)}
    # The in-place launch alone (what a model calls), without the clones of the wrapper above:
    inplace = {"ours_inplace": lambda q, k: apply_rope_qk_(q.detach(), k.detach(), freqs)}
    if only_ours:
        inplace = {f"ours_inplace[{only_ours}]": inplace["ours_inplace"]}
    nbytes = 2 * s * b * (nq + nkv) * d * 2  # read + write q and k
    run_op("rope_qk", _only(impls, only_ours), make, ref, nbytes, nbytes, copy_gbs,
           extra_fwd=inplace)


def bench_attention(dev, b, s, nq, nkv, d, copy_gbs):
    def make():
        return [torch.randn(b, n, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                for n in (nq, nkv, nkv)]

    rep = nq // nkv

    def sdpa_repeat(q, k, v):  # the usual GQA baseline: K/V repeated in memory
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                              v.repeat_interleave(rep, 1), is_causal=True)

    impls = {"ours": lambda q, k, v: attention(q, k, v, causal=True), "eager": sdpa_repeat}
    run_op("attn_causal", impls, make, attention_ref, 0, 0, copy_gbs)
    ids = torch.arange(s, device=dev)[None].expand(b, s) // (s // 8)  # 8 documents a row
    impls = {"ours": lambda q, k, v: attention(q, k, v, document_ids=ids),
             "eager": lambda q, k, v: F.scaled_dot_product_attention(
                 q, k, v, attn_mask=document_mask(ids, True), enable_gqa=True)}
    run_op("attn_docs", impls, make, lambda q, k, v: attention_ref(q, k, v, document_ids=ids),
           0, 0, copy_gbs)


def bench_cross_entropy(dev, n, h, v, chunks=(None,)):
    torch.manual_seed(0)
    hidden = (torch.randn(n, h, device=dev) * 0.5).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device=dev) * 0.02).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (n,), device=dev)
    labels[torch.rand(n, device=dev) < 0.1] = -100

    def materialized(hh, ww):
        return F.cross_entropy((hh @ ww.t()).float(), labels, reduction="mean")

    impls = {}
    for c in chunks:
        tag = "" if c is None else f"_c{c}"
        impls["ours_none" + tag] = lambda hh, ww, c=c: fused_linear_cross_entropy(
            hh, ww, labels, chunk_size=c).sum() / (labels != -100).sum()
        impls["ours_mean" + tag] = lambda hh, ww, c=c: fused_linear_cross_entropy(
            hh, ww, labels, reduction="mean", chunk_size=c)
    impls.update(eager=materialized, compile=compiled(materialized))
    if liger():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        lf = LigerFusedLinearCrossEntropyLoss(reduction="mean")
        impls["liger"] = lambda hh, ww: lf(ww, hh, labels)

    h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    want = F.cross_entropy(h32 @ w32.t(), labels)
    want_g = torch.autograd.grad(want, [h32, w32])
    del h32, w32
    for name, fn in impls.items():
        try:
            hidden.grad = weight.grad = None
            poison_allocator(dev)
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if dev == "cuda" else 0
            loss = fn(hidden, weight)
            loss.backward()
            peak = (torch.cuda.max_memory_allocated() - base) if dev == "cuda" else 0
            record_check("linear_ce", name, "loss", rel_err(loss, want), 1e-2)
            record_check("linear_ce", name, "grad_hidden", rel_err(hidden.grad, want_g[0]), 2e-2)
            record_check("linear_ce", name, "grad_weight", rel_err(weight.grad, want_g[1]), 2e-2)

            def step(fn=fn):
                fn(hidden, weight).backward()

            ms = bench_ms(step, grad_to_none=[hidden, weight])
        except Exception as e:  # noqa: BLE001
            log(f"linear_ce/{name} failed: {type(e).__name__}: {e}")
            continue
        RESULTS["memory"].append({"op": "linear_ce", "impl": name, "peak_bytes": peak, "ms": ms})
        log(f"linear_ce        {name:<10} fwd+bwd {ms:8.3f} ms  peak {peak / 2**20:9.1f} MiB")
        hidden.grad = weight.grad = None


# ---------------------------------------------------------------- tuning sweep


def sweep(dev, copy_gbs):
    """Time our kernels under several launch shapes (each checked in bf16 first)."""
    mods = {k: sys.modules[f"kernels.{k}"] for k in ("rmsnorm", "swiglu", "rope")}
    rms_keys = ("fwd_rows", "fwd_warps", "bwd_warps", "bwd_rows", "bwd_per_sm", "bwd_stages",
                "bwd_res_rows", "bwd_res_per_sm", "bwd_res_stages", "bwd_dw_atomic", "bwd_even",
                "bwd_split", "bwd_maxnreg")
    variants = {
        # backward per case (plain, then with the residual's gradient): rows per tile, programs
        # per SM, pipeline stages (1: the loop as written; k: loads of k - 1 tiles ahead in
        # flight through shared memory); bwd_dw_atomic: dW summed in the backward kernel (1) or
        # over partial rows by a second kernel (0, the fixed-order path of deterministic mode);
        # bwd_even: programs trimmed to equal tile counts; bwd_split: a row in two power-of-two
        # column parts, not one padded; bwd_maxnreg: register cap per thread (0: none)
        "rmsnorm": [dict(zip(rms_keys, (2, 8, w, r, ps, st, r, ps, st, a, 1, 1, 0)))
                    for w, r, ps, st, a in [
                        (8, 1, 2, 1, 1), (8, 1, 2, 3, 1), (8, 1, 1, 4, 1), (8, 1, 1, 5, 1),
                        (8, 1, 1, 6, 1), (8, 1, 1, 8, 1), (8, 1, 2, 4, 1), (8, 2, 1, 4, 1),
                        (4, 1, 2, 4, 1), (8, 1, 1, 6, 0)]],
        "swiglu": [{"block": b, "rows": r, "warps": w, "bwd_block": bb, "bwd_rows": br,
                    "bwd_warps": bw}
                   for b, r, w, bb, br, bw in [(2048, 1, 8, 1024, 2, 8), (1024, 1, 4, 1024, 1, 4)]],
        "rope": [{"tokens": t, "heads": h, "warps": w, "bwd_tokens": t, "bwd_heads": h,
                  "bwd_warps": w}
                 for t, h, w in [(4, 4, 4), (2, 4, 4), (4, 4, 2), (8, 4, 8)]],
    }
    for name, vs in variants.items():
        for v in vs:
            mods[name].TUNE.update(v)
            tag = _tag(v)
            if name == "rmsnorm":
                bench_rmsnorm(dev, 8192, 2560, copy_gbs, False, only_ours=tag)
                bench_rmsnorm(dev, 8192, 2560, copy_gbs, True, only_ours=tag)
            elif name == "swiglu":
                bench_swiglu(dev, 8192, 6912, copy_gbs, only_ours=tag)
            else:
                bench_rope(dev, 4096, 2, 20, 4, 128, copy_gbs, only_ours=tag)
        choose(name, vs, mods[name].TUNE)


def _tag(v):
    return ",".join(str(x) for x in v.values())


def choose(name, variants, tune):
    """Set the fastest launch shape per phase (summed over the op's cases) into tune."""
    ops = {"rmsnorm": ("rmsnorm", "rmsnorm+res"), "swiglu": ("swiglu",), "rope": ("rope_qk",)}
    chosen = {}
    for phase in ("fwd", "bwd"):
        def total(v, phase=phase):
            tag = _tag(v)
            impls = ({f"ours_inplace[{tag}]"} if name == "rope" and phase == "fwd"
                     else {f"ours[{tag}]"})
            rows = [r["ms"] for r in RESULTS["ops"] if r["op"] in ops[name]
                    and r["impl"] in impls and r["phase"] == phase]
            return sum(rows) if rows else float("inf")
        best = min(variants, key=total)
        keys = [k for k in best if k.startswith("bwd_") == (phase == "bwd")]
        chosen.update({k: best[k] for k in keys})
        if name == "rmsnorm" and phase == "bwd":
            # the backward's per-case keys (bwd_ / bwd_res_) from each case's own fastest variant
            for op, pre in (("rmsnorm", "bwd_"), ("rmsnorm+res", "bwd_res_")):
                def alone(v, op=op):
                    return next((r["ms"] for r in RESULTS["ops"] if r["op"] == op
                                 and r["impl"] == f"ours[{_tag(v)}]" and r["phase"] == "bwd"),
                                float("inf"))
                own = min(variants, key=alone)
                chosen.update({pre + k: own[pre + k] for k in ("rows", "per_sm", "stages")})
    tune.update(chosen)
    RESULTS.setdefault("chosen", {})[name] = dict(tune)
    log(f"chosen {name}: {tune}")


def _ce_chunk_times(dev, w, c):
    from bluelm_kernels.cross_entropy import _Chunks

    v, h = w.shape
    hid = (torch.randn(c, h, device=dev) * 0.5).to(torch.bfloat16)
    lab = torch.randint(0, v, (c,), device=dev)
    ch = _Chunks(hid, w, lab, -100, None, c)
    logits = hid @ w.t()
    lse, g = torch.randn(c, device=dev), torch.ones(c, device=dev)
    m_, s_, t_ = (torch.empty(c, device=dev) for _ in range(3))
    gh, gw = torch.empty_like(hid), torch.zeros_like(w)
    return {"chunk": c, "logits_bytes": logits.numel() * 2,
            "logits_mm": bench_ms(lambda: hid @ w.t()),
            "stats_kernel": bench_ms(lambda: ch.stats(logits, lab, m_, s_, t_)),
            "grad_kernel": bench_ms(lambda: ch.grad_(logits, lab, lse, g)),
            "grad_h_mm": bench_ms(lambda: torch.mm(logits, w, out=gh)),
            "grad_w_addmm": bench_ms(lambda: gw.addmm_(logits.t(), hid))}


def ce_breakdown(dev, h=2560, v=100352):
    """Time the pieces of one fused-CE chunk: which part is slow?"""
    w = (torch.randn(v, h, device=dev) * 0.02).to(torch.bfloat16)
    for c in (1024, 2048, 4096):
        row = _ce_chunk_times(dev, w, c)
        RESULTS.setdefault("ce_breakdown", []).append(row)
        log("ce chunk", {k: round(x, 4) if isinstance(x, float) else x for k, x in row.items()})


# ---------------------------------------------------------------- CUDA-graph probe


def graph_probe():
    """Time RMSNorm's forward + backward by capturing ``autograd.grad`` in a CUDA graph (why
    ``gpu_ms`` queues calls instead) and report where that capture fails. Run in a subprocess: a
    failed capture can leave the CUDA context unusable."""
    dev = "cuda"
    x = torch.randn(8192, 2560, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(2560, device=dev, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(8192, 2560, device=dev, dtype=torch.bfloat16)

    def capture(tag, fn):
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            torch.cuda.synchronize()
            log(f"graph probe {tag}: capture + replay OK")
        except Exception as e:  # noqa: BLE001
            log(f"graph probe {tag}: capture FAILED: {type(e).__name__}: {str(e)[:300]}")
            try:
                torch.cuda.synchronize()
                torch.ones(1, device=dev).sum().item()
                log(f"graph probe {tag}: context still usable")
            except Exception as e2:  # noqa: BLE001
                log(f"graph probe {tag}: context POISONED: {type(e2).__name__}: {str(e2)[:200]}")

    capture("fwd", lambda: rmsnorm(x, w))
    y = rmsnorm(x, w)  # graph recorded outside the capture, on the default stream
    capture("bwd (autograd.grad of an outside graph)",
            lambda: torch.autograd.grad(y, [x, w], up, retain_graph=True))


# ---------------------------------------------------------------- main


def kernel_resources():
    """Registers / spills of every compiled variant of our kernels (the compiler's report)."""
    rm, ro, sw = (sys.modules[f"kernels.{k}"] for k in ("rmsnorm", "rope", "swiglu"))

    rows = []
    for fn in (rm._rmsnorm_fwd_kernel, rm._rmsnorm_bwd_kernel, rm._sum_rows_kernel,
               sw._swiglu_fwd_kernel, sw._swiglu_bwd_kernel, ro._rope_kernel):
        try:
            for cache in getattr(fn, "device_caches", {}).values():
                for key, k in cache[0].items():
                    md = k.metadata
                    rows.append({"kernel": fn.__name__, "key": str(key)[-160:],
                                 "n_regs": getattr(k, "n_regs", None),
                                 "n_spills": getattr(k, "n_spills", None),
                                 "num_warps": getattr(md, "num_warps", None),
                                 "shared": getattr(md, "shared", None)})
        except Exception as e:  # noqa: BLE001
            rows.append({"kernel": fn.__name__, "error": repr(e)})
    RESULTS["kernel_resources"] = rows
    spills = [r for r in rows if r.get("n_spills")]
    log(f"compiled kernel variants: {len(rows)}; with register spills: "
        f"{[(r['kernel'], r['n_regs'], r['n_spills']) for r in spills]}")


def table():
    head = f"{'op':<13}{'impl':<36}{'ph':<4}{'ms':>9}{'GB/s':>9}{'%copy':>7}"
    env = RESULTS["env"]
    lines = [f"copy bandwidth: {env['copy_gbs']:.0f} GB/s (read+write; 1 GiB copy "
             f"{env.get('copy_gbs_1GiB', 0):.0f}, 84 MB copy {env.get('copy_gbs_84MB', 0):.0f})",
             head + f"{'x eager':>8}{'x comp':>8}{'host':>7}"]
    by = {(r["op"], r["impl"], r["phase"]): r for r in RESULTS["ops"]}
    for r in RESULTS["ops"]:
        e = by.get((r["op"], "eager", r["phase"]))
        c = by.get((r["op"], "compile", r["phase"]))
        sp_e = f"{e['ms'] / r['ms']:8.2f}" if e else " " * 8
        sp_c = f"{c['ms'] / r['ms']:8.2f}" if c else " " * 8
        host = f"{r.get('host_ms', 0):6.3f}" + ("*" if r.get("starved") else " ")
        lines.append(f"{r['op']:<13}{r['impl']:<36}{r['phase']:<4}{r['ms']:9.4f}{r['gbs']:9.0f}"
                     f"{r['pct_copy']:7.1f}{sp_e}{sp_c}{host}")
    lines.append(f"{'linear_ce':<13}{'impl':<36}{'fwd+bwd ms':>11}{'peak MiB':>10}")
    for r in RESULTS["memory"]:
        lines.append(f"{'':<13}{r['impl']:<36}{r['ms']:11.3f}{r['peak_bytes'] / 2**20:10.1f}")
    bad = [c for c in RESULTS["checks"] if not c["ok"]]
    lines.append(f"checks: {len(RESULTS['checks']) - len(bad)}/{len(RESULTS['checks'])} passed")
    lines += [f"  FAILED {c['op']}/{c['impl']}/{c['tensor']} rel {c['rel_err']:.2e}" for c in bad]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    ap.add_argument("--only", default="", help="comma list: rmsnorm,swiglu,rope,attn,ce")
    ap.add_argument("--sweep", action="store_true", help="time launch-shape variants, keep the best")
    ap.add_argument("--ce-breakdown", action="store_true", help="time the pieces of one CE chunk")
    ap.add_argument("--ce-chunks", default="", help="comma list of extra chunk sizes to time")
    ap.add_argument("--graph-probe", action="store_true", help="retry the old CUDA-graph timing")
    args = ap.parse_args()
    if args.graph_probe:
        graph_probe()
        return 0
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    only = set(args.only.split(",")) if args.only else {"rmsnorm", "swiglu", "rope", "attn", "ce"}
    sm = args.smoke
    tokens, hid, ffn = (64, 96, 80) if sm else (8192, 2560, 6912)
    RESULTS["env"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name()
                          if dev == "cuda" else "cpu", "smoke": sm, "liger": liger()}
    try:
        import triton

        RESULTS["env"]["triton"] = triton.__version__
    except ImportError:
        pass
    big = RESULTS["env"]["copy_gbs_1GiB"] = copy_bandwidth(dev)
    # % of copy is taken against the faster of the two copies (the stricter target)
    RESULTS["env"]["copy_gbs"] = cgb = max(big, RESULTS["env"].get("copy_gbs_84MB", 0))
    log(RESULTS["env"])
    out = os.environ.get("OUT", ".")
    steps = [("rmsnorm", lambda: bench_rmsnorm(dev, tokens, hid, cgb, False)),
             ("rmsnorm", lambda: bench_rmsnorm(dev, tokens, hid, cgb, True)),
             ("swiglu", lambda: bench_swiglu(dev, tokens, ffn, cgb)),
             ("rope", lambda: bench_rope(dev, tokens // 2, 2, 20 if not sm else 5,
                                         4 if not sm else 1, 128 if not sm else 16, cgb)),
             ("attn", lambda: bench_attention(dev, 2, 4096 if not sm else 32, 20 if not sm else 4,
                                              4 if not sm else 1, 128 if not sm else 16, cgb)),
             ("ce", lambda: bench_cross_entropy(dev, 4096 if not sm else 40, hid,
                                                100352 if not sm else 300))]
    if args.sweep and dev == "cuda":
        steps = [("sweep", lambda: sweep(dev, cgb))] + steps
        if args.ce_breakdown:
            steps.insert(1, ("ce", lambda: ce_breakdown(dev)))
        only |= {"sweep"}
    if args.ce_chunks:
        extra = tuple(int(c) for c in args.ce_chunks.split(","))
        steps[-1] = ("ce", lambda: bench_cross_entropy(dev, 4096 if not sm else 40, hid,
                                                       100352 if not sm else 300,
                                                       (None, *extra)))
    for key, step in steps:
        if key in only:
            step()
            with open(os.path.join(out, "bench_kernels.json"), "w") as f:
                json.dump(RESULTS, f, indent=1)
    if dev == "cuda":
        kernel_resources()
        with open(os.path.join(out, "bench_kernels.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
    log(table())
    return 0 if all(c["ok"] for c in RESULTS["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
