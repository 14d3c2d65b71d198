"""The decode step's few-row products: kernels.gemv (fused norm / SwiGLU) against cuBLAS + our unfused
kernels, on the bluelm-2.5-3b decoder's shapes, plus a device check of kernels.decode_step.

    python -m kernels.bench.gemv_bench                 # CUDA; prints a table, --out writes JSON
    TRITON_INTERPRET=1 python -m kernels.bench.gemv_bench --smoke    # CPU: tiny shapes, checks only

Per (rows, product): GPU time of the product as the decode step runs it (one CUDA graph over
``--layers`` distinct weight copies, so weights come from HBM, not L2), the bytes it must read over
that time (GB/s, % of the copy bandwidth measured here), for
  * unfused: what the step ran before (kernels.rmsnorm with the residual, cuBLAS, kernels.swiglu);
  * gemv: kernels.gemv with the launch shape its tuner picks (also reported);
and the largest error of each against an fp32 reference, relative to the reference's largest value.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from kernels import gemv as gv
from kernels.decode_step import greedy_pick, greedy_pick_ref, update_rows, update_rows_ref
from kernels.rmsnorm import rmsnorm
from kernels.swiglu import swiglu

H, FFN, QKV, VOCAB = 2560, 6912, (20 + 2 * 4) * 128, 100352
PRODUCTS = {  # name: (N, K, variant)
    "qkv (norm+res)": (QKV, H, "norm"),
    "proj": (H, H, "plain"),
    "fc1 (norm+res+swiglu)": (2 * FFN, H, "swiglu"),
    "fc2": (H, FFN, "plain"),
    "output (norm)": (VOCAB, H, "final"),
}


def graph_ms(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        g.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / iters


def copy_bandwidth(dev):
    x = torch.empty(1 << 29, dtype=torch.float16, device=dev)
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / (graph_ms(lambda: y.copy_(x)) / 1e3)


def product(variant, x, r, g, w, fused: bool):
    eps = 1e-5
    if fused:
        if variant == "plain":
            return gv.gemv(x, w)
        if variant == "final":
            return gv.gemv(x, w, norm=(g, eps))
        return gv.gemv(x, w, norm=(g, eps), residual=r, swiglu=variant == "swiglu")[0]
    if variant == "plain":
        return x @ w.t()
    if variant == "final":
        return rmsnorm(x, g, eps) @ w.t()
    h, _ = rmsnorm(x, g, eps, residual=r)
    y = h @ w.t()
    return swiglu(y) if variant == "swiglu" else y


def bench_products(dev, dtype, rows_list, layers, smoke):
    bw = float("nan") if smoke else copy_bandwidth(dev)
    out = []
    for rows in rows_list:
        for name, (n, k, variant) in PRODUCTS.items():
            if smoke:
                n, k = max(8, n // 256), max(16, k // 64)
            copies = 1 if smoke or name.startswith("output") else layers
            ws = [torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5 for _ in range(copies)]
            x = torch.randn(rows, k, device=dev, dtype=dtype)
            r = torch.randn(rows, k, device=dev, dtype=dtype)
            g = (torch.rand(k, device=dev) + 0.5).to(dtype)
            ref = gv.gemv_ref(x.float(), ws[0].float(), None if variant == "plain" else (g.float(), 1e-5),
                              r.float() if variant in ("norm", "swiglu") else None, variant == "swiglu")
            ref = ref[0] if isinstance(ref, tuple) else ref
            row = {"rows": rows, "product": name, "N": n, "K": k}
            for impl, fused in (("unfused", False), ("gemv", True)):
                y = product(variant, x, r, g, ws[0], fused)
                row[f"{impl}_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
                if not smoke:
                    ms = graph_ms(lambda f=fused: [product(variant, x, r, g, w, f) for w in ws]) / copies
                    row[f"{impl}_ms"] = ms
                    row[f"{impl}_gbs"] = ws[0].numel() * ws[0].element_size() / (ms / 1e3) / 1e9
                    row[f"{impl}_pct_copy"] = 100 * row[f"{impl}_gbs"] * 1e9 / bw
            key = [c for c in gv._TUNED if c[:3] == (rows, n // 2 if variant == "swiglu" else n, k)]
            row["gemv_shape"] = str(gv._TUNED.get(key[-1])) if key else "default"
            out.append(row)
            print(json.dumps(row), flush=True)
    return bw, out


def check_decode_step(dev, rows=256, vocab=VOCAB):
    """The decision kernels on the device vs their references (bf16 logits, random row states)."""
    import types

    logits = torch.randn(rows, vocab, device=dev).bfloat16()
    ban = torch.zeros(vocab, device=dev)
    ban[-min(352, vocab // 4):] = float("-inf")  # the padded vocabulary rows
    think = torch.tensor([4, 5], device=dev)
    bstate = torch.randint(0, 3, (rows,), device=dev)
    tok, lp = greedy_pick(logits, ban, think, bstate)
    tok_r, lp_r = greedy_pick_ref(logits, ban, think, bstate)
    res = {"greedy_tokens_equal": bool(torch.equal(tok, tok_r)), "greedy_lp_max_err": float((lp - lp_r).abs().max())}

    def ri(lo, hi, *shape):
        return torch.randint(lo, hi, shape or (rows,), device=dev)

    st = types.SimpleNamespace(
        token=ri(0, 50), pos=ri(0, 50), gen=ri(0, 9), limit=ri(1, 9), limit_reason=ri(2, 4), active=ri(0, 4) > 0,
        finish=ri(0, 2), bstate=ri(0, 3), bcount=ri(0, 8), grace=ri(0, 3), budget=ri(-1, 8), force_idx=ri(-1, 4),
        utf8_pending=ri(0, 3), out_token=ri(0, 50, rows, 8), out_logp=torch.randn(rows, 8, device=dev),
        out_forced=ri(0, 2, rows, 8) > 0, close_ids=ri(0, 50, 128), close_len=torch.tensor([3], device=dev),
        think_ids=think, utf8=ri(-1, 4, 50), sentence_end=ri(0, 3, 50) == 0,
        stop_ids=torch.cat([torch.tensor([3, 7], device=dev), torch.full((14,), -1, device=dev)]))
    ref = types.SimpleNamespace(**{k: v.clone() for k, v in vars(st).items()})
    t, p = ri(0, 50), torch.randn(rows, device=dev)
    update_rows(st, t, p, rows)
    update_rows_ref(ref, t, p, rows)
    res["update_rows_equal"] = all(torch.equal(getattr(st, k), getattr(ref, k)) for k in vars(st))
    if dev.type == "cuda":
        res["greedy_ms_1_row"] = graph_ms(lambda: greedy_pick(logits[:1], ban, think, bstate[:1]), 50)
        res["greedy_ms_256_rows"] = graph_ms(lambda: greedy_pick(logits, ban, think, bstate), 50)
        res["update_ms_256_rows"] = graph_ms(lambda: update_rows(st, t, p, rows), 50)
    print(json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the interpreter")
    ap.add_argument("--rows", default="1,4,8")
    ap.add_argument("--layers", type=int, default=28, help="distinct weight copies per timed product")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cpu" if a.smoke else "cuda")
    dtype = torch.float32 if a.smoke else torch.bfloat16
    bw, rows = bench_products(dev, dtype, [int(r) for r in a.rows.split(",")], a.layers, a.smoke)
    step = check_decode_step(dev, rows=8 if a.smoke else 256, vocab=300 if a.smoke else VOCAB)
    if not a.smoke:
        print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s")
        print(f"{'rows':>4} {'product':>22} {'unfused ms':>10} {'GB/s':>6} {'gemv ms':>8} {'GB/s':>6} {'%copy':>6} "
              f"{'speed-up':>8}  shape")
        for r in rows:
            print(f"{r['rows']:>4} {r['product']:>22} {r['unfused_ms']:>10.4f} {r['unfused_gbs']:>6.0f} "
                  f"{r['gemv_ms']:>8.4f} {r['gemv_gbs']:>6.0f} {r['gemv_pct_copy']:>6.1f} "
                  f"{r['unfused_ms'] / r['gemv_ms']:>8.2f}  {r['gemv_shape']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"copy_bandwidth": bw, "products": rows, "decode_step": step}, f, indent=1)


if __name__ == "__main__":
    main()
