"""Variable-length (packed-document) causal attention: flash vs cuDNN, forward + backward, same documents.

    python -m bluelm_kernels.bench.varlen_backends_bench                   # one GPU: bluelm-2.5-3b's shape
    python -m bluelm_kernels.bench.varlen_backends_bench --tokens 8192 --doc-mean 900 --heads 20,4 --dim 128

The decoder's packed rows run their documents through ``aten._flash_attention_forward`` with cumulative
lengths (bluelm_kernels/attention.py, the ``varlen`` path; PyTorch's flash kernels are FlashAttention-2,
which does not use Hopper's wgmma / TMA). ``aten._cudnn_attention_forward`` takes the same cumulative
lengths; PyTorch's cuDNN path has no GQA for them, so its K / V are repeated to the query heads here (the
repeat and the backward's sum over each group are inside its timing). Per variant: forward and
forward + backward milliseconds (fastest of ``--repeats`` after two warm-up calls), TFLOP/s on the
documents' work (4 · Σ len² / 2 · heads · d forward, causal; backward 2.5x), and the largest
difference of the output and the q / k / v gradients from flash's, relative to flash's largest value.
A variant that fails prints its error. CUDA only (elsewhere it says so and exits).
"""
from __future__ import annotations

import argparse
import json

import torch

from bluelm_kernels.sdpa_choice import _seconds  # the fastest of n timed calls after two untimed

aten = torch.ops.aten


def doc_lengths(tokens: int, mean: int, row: int, gen: torch.Generator) -> list[int]:
    """Document lengths filling ``tokens`` positions, rows of ``row`` (no document crosses a row end),
    lengths exponential around ``mean`` (at least 16)."""
    out = []
    for _ in range(tokens // row):
        left = row
        while left > 0:
            n = max(16, int(torch.empty(1).exponential_(1.0 / mean, generator=gen).item()))
            n = min(n, left)
            out.append(n)
            left -= n
    return out


def flash(q, k, v, cu, max_len, scale):
    out, lse, rng, unused, _ = aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False,
                                                             scale=scale)

    def backward(dout):
        return aten._flash_attention_backward(dout, q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, True, rng,
                                              unused, scale=scale)
    return out, backward


def cudnn(q, k, v, cu, max_len, scale):
    rep = q.shape[1] // k.shape[1]
    kx, vx = (t.repeat_interleave(rep, dim=1) if rep > 1 else t for t in (k, v))
    res = aten._cudnn_attention_forward(q, kx, vx, None, cu, cu, max_len, max_len, True, 0.0, True, False,
                                        scale=scale)
    out, lse, seed, offset = res[0], res[1], res[6], res[7]

    def backward(dout):
        dq, dk, dv = aten._cudnn_attention_backward(dout, q, kx, vx, out, lse, seed, offset, None, cu, cu, max_len,
                                                    max_len, 0.0, True, scale=scale)
        if rep > 1:
            dk, dv = (t.view(t.shape[0], -1, rep, t.shape[-1]).sum(2) for t in (dk, dv))
        return dq, dk, dv
    return out, backward


VARIANTS = {"flash": flash, "cudnn": cudnn}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="positions of the folded micro-batch")
    ap.add_argument("--row", type=int, default=4096, help="row length (documents never cross a row end)")
    ap.add_argument("--doc-mean", type=int, default=900)
    ap.add_argument("--heads", default="20,4", help="query heads, KV heads")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the rows as JSON")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("varlen_backends_bench: CUDA only (nothing to compare on this machine)")
        return
    gen = torch.Generator().manual_seed(args.seed)
    lengths = doc_lengths(args.tokens, args.doc_mean, args.row, gen)
    nq, nkv = (int(x) for x in args.heads.split(","))
    d, t = args.dim, sum(lengths)
    dev = torch.device("cuda")
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
    max_len = max(lengths)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    q, k, v = (torch.randn(t, n, d, device=dev, dtype=torch.bfloat16, generator=g) for n in (nq, nkv, nkv))
    dout = torch.randn(t, nq, d, device=dev, dtype=torch.bfloat16, generator=g)
    sq = sum(n * n for n in lengths)
    fwd_flops = 4 * sq / 2 * nq * d
    print(f"{len(lengths)} documents in {t} positions (max {max_len}); heads {nq}/{nkv}, d {d}; "
          f"Σ len² / tokens² = {sq / t**2:.4f}", flush=True)
    rows, ref = [], None
    for name, fn in VARIANTS.items():
        row = {"variant": name}
        try:
            out, backward = fn(q, k, v, cu, max_len, None)
            grads = backward(dout)
            got = [out, *grads]
            if ref is None:
                ref = got
            scale = [float(r.float().abs().max()) for r in ref]
            row["max_rel_diff_vs_flash"] = [round(float((a.float() - b.float()).abs().max()) / max(s, 1e-6), 5)
                                            for a, b, s in zip(got, ref, scale)]
            fwd_s = _seconds(lambda fn=fn: fn(q, k, v, cu, max_len, None), args.repeats)
            both_s = _seconds(lambda fn=fn: fn(q, k, v, cu, max_len, None)[1](dout), args.repeats)
            row.update(fwd_ms=fwd_s * 1e3, fwd_bwd_ms=both_s * 1e3, fwd_tflops=fwd_flops / fwd_s / 1e12,
                       fwd_bwd_tflops=3.5 * fwd_flops / both_s / 1e12)
        except Exception as exc:  # noqa: BLE001  (a backend that rejects the call is reported, not fatal)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0].get("fwd_bwd_ms")
    for row in rows[1:]:
        if base and row.get("fwd_bwd_ms"):
            print(f"{row['variant']}: forward + backward {base / row['fwd_bwd_ms']:.2f}x flash's speed", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
