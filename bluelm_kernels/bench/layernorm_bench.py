"""The ViT's LayerNorm (SigLIP: hidden 1152, eps 1e-6, bf16 activations and parameters): ours
(``bluelm_kernels.layernorm``) against PyTorch's ``F.layer_norm`` in bf16 (the fused backend's
previous norm, models/vision.py's NativeLayerNorm) and the torch backend's fp32 LayerNorm, checked
and timed in one run.

    python -m bluelm_kernels.bench.layernorm_bench --out layernorm_h200.json     # CUDA
    python -m bluelm_kernels.bench.layernorm_bench --sweep --out ...            # + launch shapes of ours
    TRITON_INTERPRET=1 python -m bluelm_kernels.bench.layernorm_bench --smoke   # CPU: tiny, checks (+ layout)

Rows: 22646 = one micro-batch of ~34 tiles x 676 patches (so400m at 378 px; two micro-batch-1
records' worth), and 11323. Per implementation: GPU time of the forward, the backward (dx, dW, dB;
autograd.grad of a retained graph) and forward + backward, each on input sets rotated so the
tensors come from HBM, not L2 (``bench_kernels.gpu_ms``: host launch overhead excluded); the bytes
each phase must move (fwd: read x, write y; bwd: read x, dy, write dx; bf16) over that time as
GB/s; and a check of y, dx, dW, dB against fp32 math on the same bf16 inputs (relative error
< 1e-2, before and after the timed calls: the atomic dW workspace is reused across calls). The
table ends with the ViT's 55 norms (27 layers x 2 + the final one) per micro-batch.
``--tune KEY=VALUE,...`` overrides ``layernorm.TUNE``; ``--sweep`` times launch-shape variants of
the forward and of the backward at the first row count and prints the fastest.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from bluelm_kernels.bench import finish_checks
from bluelm_kernels.bench.bench_kernels import gpu_ms, n_sets_for, poison_allocator, rel_err
from bluelm_kernels.dispatch import interpreting
from bluelm_kernels.layernorm import TUNE, layernorm, layernorm_ref

HIDDEN, EPS, NORMS_PER_MICRO_BATCH = 1152, 1e-6, 55
TOLERANCE = 1e-2  # relative (norm) error of a bf16 result against fp32 math on the same inputs

IMPLS = {
    "ours": lambda x, w, b: layernorm(x, w, b, EPS),
    "torch_bf16": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS),
    "torch_fp32": lambda x, w, b: layernorm_ref(x, w, b, EPS),
}


def _make(m, h, dev):
    x = torch.randn(m, h, device=dev, dtype=torch.bfloat16).mul_(2).add_(0.5).requires_grad_()
    w = (torch.rand(h, device=dev) + 0.5).to(torch.bfloat16).requires_grad_()
    b = (0.1 * torch.randn(h, device=dev)).to(torch.bfloat16).requires_grad_()
    return [x, w, b], torch.randn(m, h, device=dev, dtype=torch.bfloat16)


def _check(fn, inputs, dy):
    """Relative errors of (y, dx, dW, dB) against fp32 math on fp32 copies of the bf16 inputs."""
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    want_y = F.layer_norm(leaves[0], (leaves[0].shape[-1],), leaves[1], leaves[2], EPS)
    want = (want_y, *torch.autograd.grad(want_y, leaves, dy.float()))
    poison_allocator(inputs[0].device.type)
    y = fn(*inputs)
    got = (y, *torch.autograd.grad(y, inputs, dy))
    return {name: rel_err(g, r) for name, g, r in zip(("y", "dx", "dw", "db"), got, want)}


def _time(fn, sets, ups):
    """(forward, backward, forward + backward) as gpu_ms tuples (ms, host ms, starved)."""
    n = len(sets)
    fwd = gpu_ms(lambda i: fn(*sets[i]), n)
    outs = [fn(*s) for s in sets]
    bwd = gpu_ms(lambda i, outs=outs: torch.autograd.grad(outs[i], sets[i], ups[i], retain_graph=True), n)
    del outs
    both = gpu_ms(lambda i: torch.autograd.grad(fn(*sets[i]), sets[i], ups[i]), n)
    return fwd, bwd, both


def _bytes(m, h):
    act = m * h * 2  # one bf16 [m, h] tensor
    return {"fwd": 2 * act, "bwd": 3 * act, "fwd+bwd": 5 * act}


def run(m, h, dev, timed, impls):
    inputs, dy = _make(m, h, dev)
    n = n_sets_for(_bytes(m, h)["fwd"]) if timed else 1
    made = [_make(m, h, dev) for _ in range(n)]
    sets, ups = [s for s, _ in made], [u for _, u in made]
    res = []
    for name in impls:
        fn = IMPLS[name]
        r = {"rows": m, "hidden": h, "impl": name, "rel_err": _check(fn, inputs, dy)}
        if timed:
            for phase, t in zip(("fwd", "bwd", "fwd+bwd"), _time(fn, sets, ups)):
                r[phase] = {"ms": t[0], "gbs": _bytes(m, h)[phase] / t[0] / 1e6, "host_ms": t[1],
                            "starved": t[2]}
            r["rel_err_after_timing"] = _check(fn, inputs, dy)
        errs = list(r["rel_err"].values()) + list(r.get("rel_err_after_timing", {}).values())
        r["ok"] = all(e < TOLERANCE for e in errs)  # NaN compares False: fails
        res.append(r)
        print(json.dumps(r), flush=True)
    return res


FWD_SWEEP = {"fwd_rows": (1, 2, 4, 8), "fwd_warps": (4, 8, 16), "fwd_split": (0, 1)}
BWD_SWEEP = {"bwd_rows": (1, 2), "bwd_per_sm": (1, 2, 4), "bwd_stages": (2, 4, 6), "bwd_warps": (4, 8)}


def sweep(m, h, dev, limit=None):
    """Each forward and backward launch shape of ours timed on its own phase (the first ``limit``
    of each: the smoke run's); TUNE restored."""
    made = [_make(m, h, dev) for _ in range(n_sets_for(_bytes(m, h)["fwd"]))]
    sets, ups = [s for s, _ in made], [u for _, u in made]
    inputs, dy = _make(m, h, dev)
    saved, out = dict(TUNE), {}
    for phase, grid in (("fwd", FWD_SWEEP), ("bwd", BWD_SWEEP)):
        rows = []
        for values in itertools.islice(itertools.product(*grid.values()), limit):
            TUNE.update(saved)
            TUNE.update(zip(grid, values))
            try:
                errs = _check(IMPLS["ours"], inputs, dy)
                if phase == "fwd":
                    t = gpu_ms(lambda i: IMPLS["ours"](*sets[i]), len(sets))
                else:
                    outs = [IMPLS["ours"](*s) for s in sets]
                    t = gpu_ms(lambda i, outs=outs: torch.autograd.grad(outs[i], sets[i], ups[i],
                                                                         retain_graph=True), len(sets))
            except Exception as e:  # noqa: BLE001  # a shape that does not compile loses itself only
                print(f"sweep {phase} {dict(zip(grid, values))}: {type(e).__name__}: {e}", flush=True)
                continue
            row = {"tune": dict(zip(grid, values)), "ms": t[0], "gbs": _bytes(m, h)[phase] / t[0] / 1e6,
                   "ok": all(e < TOLERANCE for e in errs.values())}
            rows.append(row)
            print(json.dumps({"sweep": phase, **row}), flush=True)
        best = min((r for r in rows if r["ok"]), key=lambda r: r["ms"], default=None)
        out[phase] = {"variants": rows, "best": best}
        print(f"sweep {phase}: best {best and best['tune']} {best and round(best['ms'], 4)} ms "
              f"(tuned now: {dict((k, saved[k]) for k in grid)})", flush=True)
    TUNE.update(saved)
    return out


def table(res, smoke):
    if smoke:
        print("\n(CPU interpreter: one wall-clock call per figure, not GPU time; the layout only)")
    print(f"\n{'rows':>6} {'hidden':>6} {'impl':<11}"
          + "".join(f"{p + ' ms':>12}{'GB/s':>7}" for p in ("fwd", "bwd", "fwd+bwd")))
    for r in res:
        cells = "".join(f"{r[p]['ms']:12.4f}{r[p]['gbs']:7.0f}" for p in ("fwd", "bwd", "fwd+bwd"))
        print(f"{r['rows']:>6} {r['hidden']:>6} {r['impl']:<11}{cells}")
    for key in dict.fromkeys((r["rows"], r["hidden"]) for r in res):
        by = {r["impl"]: r for r in res if (r["rows"], r["hidden"]) == key}
        line = ", ".join(f"{k} {NORMS_PER_MICRO_BATCH * v['fwd+bwd']['ms']:.2f} ms" for k, v in by.items())
        print(f"{NORMS_PER_MICRO_BATCH} norms x [{key[0]}, {key[1]}] fwd+bwd: {line}")
        if "ours" in by and "torch_bf16" in by:
            print("  ours / torch_bf16: " + ", ".join(
                f"{p} {by['ours'][p]['ms'] / by['torch_bf16'][p]['ms']:.2f}x" for p in ("fwd", "bwd", "fwd+bwd")))


def _parse_tune(text):
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in TUNE or not value.lstrip("-").isdigit():
            raise SystemExit(f"--tune {item!r}: KEY=INT with KEY one of {sorted(TUNE)}")
        out[key] = int(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1, checks only")
    ap.add_argument("--rows", default=None, help="comma list (default 22646,11323; smoke 37,5)")
    ap.add_argument("--hidden", type=int, default=None, help=f"default {HIDDEN} (smoke: {HIDDEN} and 100)")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    ap.add_argument("--tune", default="", help="KEY=INT,... overriding bluelm_kernels.layernorm.TUNE")
    ap.add_argument("--sweep", action="store_true", help="also time launch-shape variants of ours (smoke: 2 each)")
    ap.add_argument("--out", default=None, help="JSON of every result")
    a = ap.parse_args()
    if a.smoke and not interpreting():
        ap.error("--smoke runs the kernel on CPU: set TRITON_INTERPRET=1")
    if not a.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) on CPU")
    impls = a.impls.split(",")
    if not impls or any(i not in IMPLS for i in impls):
        ap.error(f"--impls: comma list of {', '.join(IMPLS)}, got {a.impls!r}")
    TUNE.update(_parse_tune(a.tune))
    dev = "cpu" if a.smoke else "cuda"
    rows = [int(v) for v in (a.rows or ("37,5" if a.smoke else "22646,11323")).split(",")]
    hiddens = [a.hidden] if a.hidden else ([HIDDEN, 100] if a.smoke else [HIDDEN])
    env = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)",
           "torch": torch.__version__, "tune": dict(TUNE)}
    print(json.dumps(env), flush=True)
    res = []
    for h in hiddens:
        for m in rows:
            res += run(m, h, dev, True, impls)
            if dev == "cuda":
                torch.cuda.empty_cache()
    swept = sweep(rows[0], hiddens[0], dev, 2 if a.smoke else None) if a.sweep else None
    table(res, a.smoke)
    finish_checks(res, a.out, {"env": env, "results": res, "sweep": swept})


if __name__ == "__main__":
    main()
