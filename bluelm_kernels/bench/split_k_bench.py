"""The decode step's few-row matmuls: cuBLAS's own choice (``x @ w.T``) against the split-K products
of ``bluelm_kernels.split_k`` (P fp32 partials from one batched GEMM over strided views of the weight).

    python -m bluelm_kernels.bench.split_k_bench --out results.json      # CUDA
    python -m bluelm_kernels.bench.split_k_bench --smoke                  # CPU: tiny, checks only

Per product of the full decoder (qkv, proj, fc1, fc2 of ``bluelm-2.5-3b``) and row count: GPU time per
layer of 28 layers' products (each layer its own weight, as in the decode step: the weights do not
stay in L2) captured in one CUDA graph, the weight read bandwidth it reaches, and each split's
relative error of the partials' sum against an fp64 product. The split times include no reduction:
in the engine the consumer (RMSNorm / SwiGLU) sums the partials. ``split_k.TUNE`` is read off this
table: the fastest split per product at 1 and 8 rows.
"""
from __future__ import annotations

import argparse
import json

import torch

from bluelm_kernels import split_k

SHAPES = {"qkv": (3584, 2560), "proj": (2560, 2560), "fc1": (13824, 2560), "fc2": (2560, 6912)}
SMOKE_SHAPES = {"qkv": (96, 64), "proj": (64, 64), "fc1": (192, 64), "fc2": (64, 96)}


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp(min=1e-30))


def run(name, n, k, rows, splits_list, layers, dev, dtype, timed):
    from bluelm_kernels.bench import graph_ms

    ws = [torch.randn(n, k, device=dev, dtype=dtype) for _ in range(layers)]
    x = torch.randn(rows, k, device=dev, dtype=dtype)
    want = x.double() @ ws[0].double().t()
    out = []
    for s in splits_list:
        if k % s or (k // s) % 8:
            continue
        if s == 1:
            def step():
                return [x @ w.t() for w in ws]
        else:
            def step(s=s):
                return [split_k.partials(x, w, s) for w in ws]
        got = step()[0]
        got = got if s == 1 else got.sum(0)
        r = {"product": name, "N": n, "K": k, "rows": rows, "splits": s, "rel_err": _rel(got, want)}
        if timed:
            ms = graph_ms(step, 100)
            r["us_per_layer"] = 1e3 * ms / layers
            r["weight_tb_s"] = layers * n * k * ws[0].element_size() / (ms / 1e3) / 1e12
        out.append(r)
        print(json.dumps(r), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, checks only")
    ap.add_argument("--rows", default="1,8", help="comma list of row counts")
    ap.add_argument("--splits", default="1,2,3,4,6,8", help="comma list (1: cuBLAS's own product)")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.smoke
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = SHAPES if cuda else SMOKE_SHAPES
    layers = a.layers if cuda else 2
    rows_list = [int(v) for v in a.rows.split(",")]
    splits_list = [int(v) for v in a.splits.split(",")]
    results = []
    for name, (n, k) in shapes.items():
        for rows in rows_list:
            results += run(name, n, k, rows, splits_list, layers, dev, dtype, timed=cuda)
    tol = 1e-2 if cuda else 1e-5
    bad = [r for r in results if r["rel_err"] > tol]
    if cuda:
        print(f"\n{'product':>8} {'rows':>4} " + " ".join(f"{'P=' + str(s):>14}" for s in splits_list))
        for name in shapes:
            for rows in rows_list:
                cells = {r["splits"]: r for r in results if r["product"] == name and r["rows"] == rows}
                line = " ".join(f"{cells[s]['us_per_layer']:6.2f}us {cells[s]['weight_tb_s']:4.2f}T" if s in cells
                                else f"{'-':>14}" for s in splits_list)
                print(f"{name:>8} {rows:>4} {line}")
        print("tuned (bluelm_kernels.split_k.TUNE):", json.dumps(split_k.TUNE))
    print(f"checks: {len(results) - len(bad)}/{len(results)} ok")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"results": results, "tune": split_k.TUNE}, f, indent=1)
    if bad:
        raise SystemExit(f"split_k_bench: {len(bad)} products off the fp64 reference by more than {tol}")


if __name__ == "__main__":
    main()
