"""The engine's decode attention (RoPE + KV-cache write + split-K attention, ``rope_cache_attention``):
the split merge fused into the decode kernel against the separate combine launch, checked and timed.

    python -m bluelm_kernels.bench.decode_attention_bench             # CUDA; --out writes JSON
    TRITON_INTERPRET=1 python -m bluelm_kernels.bench.decode_attention_bench --smoke   # CPU: tiny, checks only

Per (rows, context) — cache capacity = context, every row at its last position — and per tile size
(keys per tile: 64, the engine's, and 32 and 16, i.e. more, shorter chunks): GPU time of all ``--layers``
layers' calls (each layer its own cache and QKV rows, the step's order) captured in one CUDA graph
and replayed, for the two-launch path (decode kernel + combine kernel) and the fused one (the last
chunk program merges); and each output's relative error against the torch reference
(``rope_and_cache_ref`` + ``decode_attention_ref``), which must be at bf16 rounding. With one chunk
(large batches) both paths are the same single-launch kernel.
"""
from __future__ import annotations

import argparse
import json

import torch

from bluelm_kernels.bench import finish_checks, graph_ms
from bluelm_kernels.decode_attention import (
    _decode_attention_triton,
    decode_attention_ref,
    num_splits,
    rope_and_cache_ref,
)
from bluelm_kernels.dispatch import interpreting

TOLERANCE = 1e-2  # relative (norm) error of a bf16 output; fp32 (smoke) errors are ~1e-7


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def run(rows, ctx, a, dev, dtype, timed):
    heads, groups, d = a.heads, a.groups, a.dim
    npg = heads // groups
    pos = torch.arange(ctx, device=dev, dtype=torch.float32)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device=dev).float() / d)
    emb = torch.cat((torch.outer(pos, inv),) * 2, -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    lengths = torch.full((rows,), ctx, device=dev, dtype=torch.int64)
    layers = [(torch.randn(rows, groups * (npg + 2) * d, device=dev, dtype=dtype),
               torch.randn(rows, groups, ctx, d, device=dev, dtype=dtype),
               torch.randn(rows, groups, ctx, d, device=dev, dtype=dtype)) for _ in range(a.layers)]
    qkv0, kc0, vc0 = layers[0]
    kr, vr = kc0.clone(), vc0.clone()
    ref = decode_attention_ref(rope_and_cache_ref(qkv0, lengths - 1, cos, sin, kr, vr, heads, groups), kr, vr,
                               lengths)
    res = []
    for bn in a.block_n:
        splits = num_splits(rows, groups, ctx, dev, block=bn, sms=a.sms)
        outs = {}
        for fused in (False, True):
            def step(fused=fused, splits=splits, bn=bn):
                return [_decode_attention_triton(None, kc, vc, lengths, splits, rope=(qkv, cos, sin, heads),
                                                 fused=fused, block_n=bn) for qkv, kc, vc in layers]

            first = step()[0]
            again = step()[0]  # a second call reuses the fused path's arrival counters
            outs[fused] = first
            r = {"rows": rows, "context": ctx, "block_n": bn, "splits": splits,
                 "path": "fused" if fused else "two-kernel",
                 "rel_err": _rel(first, ref), "repeat_equal": bool(torch.equal(first, again))}
            r["ok"] = r["rel_err"] < TOLERANCE and r["repeat_equal"]
            if timed:
                r["step_ms"] = graph_ms(step, a.iters)
                r["layer_us"] = 1e3 * r["step_ms"] / a.layers
            print(json.dumps(r), flush=True)
            res.append(r)
        res[-1]["fused_vs_two_kernel_max_diff"] = float((outs[True].float() - outs[False].float()).abs().max())
    return res


def table(res, layers):
    """The timed results: one line per (rows, context, tile), the two paths side by side."""
    print(f"\n{layers} layers per step, GPU ms per step (one CUDA graph); us per layer in brackets")
    print(f"{'rows':>5} {'ctx':>5} {'BN':>3} {'splits':>6} {'two-kernel':>16} {'fused':>16} {'saved':>7} "
          f"{'rel err':>8} {'fused-two':>9}")
    for two, fus in zip(res[::2], res[1::2]):
        print(f"{two['rows']:>5} {two['context']:>5} {two['block_n']:>3} {two['splits']:>6} "
              f"{two['step_ms']:>7.4f} ({two['layer_us']:>6.2f}) {fus['step_ms']:>7.4f} ({fus['layer_us']:>6.2f}) "
              f"{two['step_ms'] - fus['step_ms']:>7.4f} {max(two['rel_err'], fus['rel_err']):>8.1e} "
              f"{fus['fused_vs_two_kernel_max_diff']:>9.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1, checks only")
    ap.add_argument("--rows", default=None, help="comma list (default 1,8,32,256; smoke 1,3)")
    ap.add_argument("--contexts", default=None, help="comma list, = cache capacity (default 128,384,1152,2176)")
    ap.add_argument("--block-n", default="64,32,16", help="keys per tile, comma list")
    ap.add_argument("--layers", type=int, default=None, help="calls per timed step (default 28; smoke 2)")
    ap.add_argument("--heads", type=int, default=None, help="query heads (default 20; smoke 10)")
    ap.add_argument("--groups", type=int, default=None, help="KV groups (default 4; smoke 2)")
    ap.add_argument("--dim", type=int, default=None, help="head dim (default 128; smoke 16)")
    ap.add_argument("--sms", type=int, default=None, help="SM count for the chunk count (default: the GPU's; smoke 8)")
    ap.add_argument("--iters", type=int, default=100, help="graph replays timed")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    smoke = a.smoke
    if smoke and not interpreting():
        ap.error("--smoke runs the kernels on CPU: set TRITON_INTERPRET=1")
    if not smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) on CPU")
    for name, full, tiny in (("rows", "1,8,32,256", "1,3"), ("contexts", "128,384,1152,2176", "40,130"),
                             ("layers", 28, 2), ("heads", 20, 10), ("groups", 4, 2), ("dim", 128, 16),
                             ("sms", None, 8)):
        if getattr(a, name) is None:
            setattr(a, name, tiny if smoke else full)
    if a.heads % a.groups:
        ap.error(f"--heads ({a.heads}) must be a multiple of --groups ({a.groups})")
    a.block_n = [int(x) for x in a.block_n.split(",")]
    if any(bn < 16 or bn & (bn - 1) for bn in a.block_n):
        ap.error(f"--block-n: powers of two >= 16 (the kernel's tl.dot tiles), got {a.block_n}")
    dev = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    res = []
    for rows in (int(x) for x in a.rows.split(",")):
        for ctx in (int(x) for x in a.contexts.split(",")):
            res += run(rows, ctx, a, dev, dtype, timed=not smoke)
            if not smoke:
                torch.cuda.empty_cache()
    if not smoke:
        table(res, a.layers)
    finish_checks(res, a.out)


if __name__ == "__main__":
    main()
