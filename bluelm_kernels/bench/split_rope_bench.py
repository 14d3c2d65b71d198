"""The decoder attention's QKV split + RoPE, forward and backward: megatron-core's split
(``torch.split`` of the grouped QKV output, the query heads reshaped: a copy) followed by
``apply_rope_qk`` (the fused backend's path until now; the split's backward concatenates dq, dk, dv
into d(mixed_qkv)) against ``split_rope_qkv`` (one op: q and k rotated from their slots, the
backward's one launch writes dq, dk, dv into d(mixed_qkv)), checked and timed in one run.

    python -m bluelm_kernels.bench.split_rope_bench --out split_rope_h200.json        # CUDA
    TRITON_INTERPRET=1 python -m bluelm_kernels.bench.split_rope_bench --smoke         # CPU: tiny, checks

Shape: bluelm-2.5-3b's attention (20 query heads, 4 KV groups, head dim 128, bf16) at 8192 tokens of
one micro-batch, as the row-folded [8192, 1, ...] (``--rows 2`` for [4096, 2, ...]). Upstream
gradients come in the layouts SDPA's backward gives them (``empty_like`` of its inputs: dq, dk
contiguous [s, b, n, d], dv [b, groups, s, d] storage, since the value is a view with gaps). Per
implementation: GPU time (``bench_kernels.gpu_ms``, input sets rotated out of L2) of the forward,
the backward (``autograd.grad`` of a retained graph, to d(mixed_qkv)) and both; GB/s over the bytes
the one-op path must move (fwd: read q, k, write them rotated; bwd: read dq, dk, dv, write
d(mixed_qkv)); and checks of q, k, v, d(mixed_qkv) against fp32 math (relative error < 1e-2, the
allocator poisoned with NaN first) and of the two paths against each other (bit for bit expected:
the same rotation arithmetic). The table ends with the 28 layers of one micro-batch.
"""
from __future__ import annotations

import argparse
import json

import torch

from bluelm_kernels.bench import finish_checks
from bluelm_kernels.bench.bench_kernels import gpu_ms, n_sets_for, poison_allocator, rel_err
from bluelm_kernels.dispatch import interpreting
from bluelm_kernels.rope import apply_rope_qk, split_rope_qkv, split_rope_qkv_ref

HEADS, GROUPS, HEAD_DIM, TOKENS, LAYERS = 20, 4, 128, 8192, 28
SMOKE = dict(heads=6, groups=2, head_dim=16, tokens=24)
TOLERANCE = 1e-2


def megatron_split_then_rope(mixed, freqs, hpg):
    """SelfAttention.get_query_key_value_tensors' split, then the fused backend's previous rope_fn."""
    s, b, _, w = mixed.shape
    d = w // (hpg + 2)
    q, k, v = torch.split(mixed, [hpg * d, d, d], dim=3)
    q, k = apply_rope_qk(q.reshape(s, b, -1, d), k, freqs)
    return q, k, v


IMPLS = {"megatron_split+rope": megatron_split_then_rope, "split_rope_qkv": split_rope_qkv}


def _freqs(s, b, d, dev):
    # per-token positions (packed documents restart them), as the model's per_token_rope gives them
    pos = (torch.arange(s * b, device=dev) % 1000).float().view(s, b)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev).float() / d))
    f = pos[..., None] * inv
    return torch.cat([f, f], -1)[:, :, None, :]


def _make(s, b, heads, groups, d, dev, dtype):
    hpg = heads // groups
    mixed = torch.randn(s, b, groups, (hpg + 2) * d, device=dev, dtype=dtype).requires_grad_()
    ups = (torch.randn(s, b, heads, d, device=dev, dtype=dtype),
           torch.randn(s, b, groups, d, device=dev, dtype=dtype),
           torch.randn(b, groups, s, d, device=dev, dtype=dtype).permute(2, 0, 1, 3))
    return mixed, ups


def _results(fn, mixed, freqs, hpg, ups):
    outs = fn(mixed, freqs, hpg)
    (grad,) = torch.autograd.grad(outs, [mixed], ups)
    return [o.detach() for o in outs] + [grad]


def _check(fn, mixed, freqs, hpg, ups):
    leaf = mixed.detach().float().requires_grad_()
    want = _results(split_rope_qkv_ref, leaf, freqs, hpg, [u.float() for u in ups])
    poison_allocator(mixed.device.type)
    got = _results(fn, mixed, freqs, hpg, ups)
    return got, {n: rel_err(g, w) for n, g, w in zip(("q", "k", "v", "dmixed"), got, want)}


def _bytes(s, b, heads, groups, d, elem):
    q, kv = s * b * heads * d * elem, s * b * groups * d * elem
    return {"fwd": 2 * (q + kv), "bwd": 2 * (q + 2 * kv), "fwd+bwd": 4 * q + 6 * kv}


def run(s, b, heads, groups, d, dev, dtype):
    hpg = heads // groups
    freqs = _freqs(s, b, d, dev)
    mixed, ups = _make(s, b, heads, groups, d, dev, dtype)
    nbytes = _bytes(s, b, heads, groups, d, mixed.element_size())
    n = n_sets_for(nbytes["fwd"]) if dev == "cuda" else 1
    sets = [_make(s, b, heads, groups, d, dev, dtype) for _ in range(n)]
    res, got = [], {}
    for name, fn in IMPLS.items():
        got[name], errs = _check(fn, mixed, freqs, hpg, ups)
        fwd = gpu_ms(lambda i, fn=fn: fn(sets[i][0], freqs, hpg), n)
        outs = [fn(m, freqs, hpg) for m, _ in sets]
        bwd = gpu_ms(lambda i, outs=outs: torch.autograd.grad(outs[i], [sets[i][0]], sets[i][1],
                                                               retain_graph=True), n)
        del outs
        both = gpu_ms(lambda i, fn=fn: torch.autograd.grad(fn(sets[i][0], freqs, hpg), [sets[i][0]],
                                                           sets[i][1]), n)
        r = {"tokens": s * b, "rows": b, "impl": name, "rel_err": errs,
             "ok": all(e < TOLERANCE for e in errs.values())}  # NaN compares False: fails
        for phase, t in zip(("fwd", "bwd", "fwd+bwd"), (fwd, bwd, both)):
            r[phase] = {"ms": t[0], "gbs": nbytes[phase] / t[0] / 1e6, "host_ms": t[1], "starved": t[2]}
        res.append(r)
        print(json.dumps(r), flush=True)
    old, new = (got[k] for k in IMPLS)
    same = {n: bool(torch.equal(a, c)) for n, a, c in zip(("q", "k", "v", "dmixed"), old, new)}
    print(json.dumps({"tokens": s * b, "rows": b, "bitwise_equal": same}), flush=True)
    return res, same


def table(res, smoke, layers):
    if smoke:
        print("\n(CPU interpreter: one wall-clock call per figure, not GPU time; the layout only)")
    print(f"\n{'tokens':>6} {'rows':>4} {'impl':<20}"
          + "".join(f"{p + ' ms':>12}{'GB/s':>7}" for p in ("fwd", "bwd", "fwd+bwd")))
    for r in res:
        cells = "".join(f"{r[p]['ms']:12.4f}{r[p]['gbs']:7.0f}" for p in ("fwd", "bwd", "fwd+bwd"))
        print(f"{r['tokens']:>6} {r['rows']:>4} {r['impl']:<20}{cells}")
    old, new = IMPLS
    for key in dict.fromkeys((r["tokens"], r["rows"]) for r in res):
        by = {r["impl"]: r for r in res if (r["tokens"], r["rows"]) == key}
        print(f"[{key[0]} tokens, {key[1]} rows] {new} / {old}: " + ", ".join(
            f"{p} {by[new][p]['ms'] / by[old][p]['ms']:.2f}x" for p in ("fwd", "bwd", "fwd+bwd"))
            + f"; {layers} layers fwd+bwd: {layers * by[old]['fwd+bwd']['ms']:.2f} -> "
            f"{layers * by[new]['fwd+bwd']['ms']:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1, checks only")
    ap.add_argument("--tokens", type=int, default=None, help=f"tokens of a micro-batch (default {TOKENS})")
    ap.add_argument("--rows", default="1", help="comma list of rows the tokens are split into (1: folded)")
    ap.add_argument("--out", default=None, help="JSON of every result")
    a = ap.parse_args()
    if a.smoke and not interpreting():
        ap.error("--smoke runs the kernel on CPU: set TRITON_INTERPRET=1")
    if not a.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) on CPU")
    dev, dtype = ("cpu", torch.float32) if a.smoke else ("cuda", torch.bfloat16)
    shape = SMOKE if a.smoke else dict(heads=HEADS, groups=GROUPS, head_dim=HEAD_DIM, tokens=TOKENS)
    tokens = a.tokens or shape["tokens"]
    env = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)",
           "torch": torch.__version__, "dtype": str(dtype), **shape, "tokens": tokens}
    print(json.dumps(env), flush=True)
    res, bitwise = [], []
    for b in (int(v) for v in a.rows.split(",")):
        if tokens % b:
            ap.error(f"--rows {b} does not divide --tokens {tokens}")
        r, same = run(tokens // b, b, shape["heads"], shape["groups"], shape["head_dim"], dev, dtype)
        res += r
        bitwise.append(same)
    table(res, a.smoke, LAYERS)
    finish_checks(res, a.out, {"env": env, "results": res, "bitwise_equal": bitwise},
                  f"; bitwise equal paths: {all(all(s.values()) for s in bitwise)}")


if __name__ == "__main__":
    main()
