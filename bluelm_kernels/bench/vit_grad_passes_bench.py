"""The ViT's gradient passes outside its GEMMs and attention, ours against PyTorch's in one run:

* bias gradients: ``bias_grad.column_sum`` against ``dy.sum(0)`` (megatron-core's linear backward), and
  ``column_sum_into_`` (into the fp32 ``main_grad``) against ``sum(0)`` + DDP's ``main_grad.add_``, at
  the four ViT linears' widths (qkv 3456, proj 1152, fc1 4304, fc2 1152);
* the QKV split's backward: ``qkv_split.cat_heads`` against ``torch.cat`` (``SplitWithSizesBackward``),
  with dq, dk, dv in [b, heads, s, d] storage;
* fc1's GELU backward with its bias gradient: ``bias_grad.gelu_tanh_backward_bias`` (one pass, into
  ``main_grad``) against ``gelu_backward`` + ``sum(0)`` + ``add_``.

    python -m bluelm_kernels.bench.vit_grad_passes_bench --out vit_grad_passes_h200.json     # CUDA
    TRITON_INTERPRET=1 python -m bluelm_kernels.bench.vit_grad_passes_bench --smoke           # CPU: checks

Shape: so400m at one micro-batch of the multimodal bench (32 tiles x 676 patches = 21632 rows, 16 heads
of 72, bf16). GPU time by ``bench_kernels.gpu_ms`` (input sets rotated out of L2); GB/s over the bytes
the pass must move; checks against fp32 math. ``--sweep`` also times other launch shapes (TUNE keys);
the table ends with the 27 layers of one micro-batch.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from bluelm_kernels import bias_grad, qkv_split
from bluelm_kernels.bench import finish_checks
from bluelm_kernels.bench.bench_kernels import copy_bandwidth, gpu_ms, n_sets_for, rel_err
from bluelm_kernels.dispatch import interpreting

TILES, PATCHES, HEADS, HEAD_DIM, LAYERS = 32, 676, 16, 72, 27
WIDTHS = {"qkv": 3 * HEADS * HEAD_DIM, "proj": HEADS * HEAD_DIM, "fc1": 4304, "fc2": HEADS * HEAD_DIM}
SMOKE = dict(tiles=3, patches=10, heads=2, head_dim=8, widths={"a": 40, "b": 300})


def _row(op, impl, ms, nbytes, copy_gbs, **extra):
    gbs = nbytes / ms / 1e6 if ms > 0 else 0.0
    return {"op": op, "impl": impl, "ms": ms, "GB/s": gbs, "of_copy": gbs / copy_gbs if copy_gbs else None, **extra}


def bench_bias(dev, rows, widths, copy_gbs, sweep):
    res = []
    for name, n in widths.items():
        dys = [torch.randn(rows, n, device=dev, dtype=torch.bfloat16) for _ in range(n_sets_for(rows * n * 2))]
        accs = [torch.zeros(n, device=dev, dtype=torch.float32) for _ in dys]
        want = dys[0].float().sum(0)
        nbytes = rows * n * 2
        checks = {"column_sum": rel_err(bias_grad.column_sum(dys[0]).float(), want)}
        acc = torch.zeros(n, device=dev)
        checks["column_sum_into_"] = rel_err(bias_grad.column_sum_into_(acc, dys[0]), want)
        ok = all(e < 1e-2 for e in checks.values())
        torch_ms = gpu_ms(lambda i, dys=dys: dys[i].sum(0), len(dys))[0]
        torch_acc_ms = gpu_ms(lambda i, dys=dys, accs=accs: accs[i].add_(dys[i].sum(0)), len(dys))[0]
        ours_ms = gpu_ms(lambda i, dys=dys: bias_grad.column_sum(dys[i]), len(dys))[0]
        ours_acc_ms = gpu_ms(lambda i, dys=dys, accs=accs: bias_grad.column_sum_into_(accs[i], dys[i]), len(dys))[0]
        res += [_row(f"bias_grad[{name} {rows}x{n}]", "torch sum(0)", torch_ms, nbytes, copy_gbs, ok=True),
                _row(f"bias_grad[{name} {rows}x{n}]", "column_sum", ours_ms, nbytes, copy_gbs, ok=ok,
                     errors=checks, speedup=torch_ms / ours_ms),
                _row(f"bias_into_main_grad[{name}]", "torch sum(0) + main_grad.add_", torch_acc_ms, nbytes,
                     copy_gbs, ok=True),
                _row(f"bias_into_main_grad[{name}]", "column_sum_into_", ours_acc_ms, nbytes, copy_gbs, ok=ok,
                     speedup=torch_acc_ms / ours_acc_ms)]
        if sweep:
            saved = dict(bias_grad.TUNE)
            for r, c, w, p in itertools.product((8, 16, 32), (128, 256, 512), (4, 8), (2, 4, 8)):
                bias_grad.TUNE.update(rows=r, cols=c, warps=w, per_sm=p)
                ms = gpu_ms(lambda i, dys=dys, accs=accs: bias_grad.column_sum_into_(accs[i], dys[i]), len(dys))[0]
                res.append(_row(f"bias_into_main_grad[{name}]", f"sweep rows={r} cols={c} warps={w} per_sm={p}",
                                ms, nbytes, copy_gbs, ok=True))
            bias_grad.TUNE.update(saved)
    return res


def bench_gelu(dev, rows, n, copy_gbs, sweep=False):
    """fc1's GELU backward and bias gradient: torch's gelu_backward, then sum(0) + main_grad.add_ (the
    unfused path) against ``gelu_tanh_backward_bias`` into main_grad (one pass)."""
    nbytes = 3 * rows * n * 2  # read dg, x, write dx
    sets = [(torch.randn(rows, n, device=dev, dtype=torch.bfloat16),
             torch.randn(rows, n, device=dev, dtype=torch.bfloat16) * 2) for _ in range(n_sets_for(nbytes))]
    accs = [torch.zeros(n, device=dev) for _ in sets]
    dg, x = sets[0]
    want = bias_grad.gelu_tanh_backward_ref(dg.float(), x.float())
    acc = torch.zeros(n, device=dev)
    dx, _ = bias_grad.gelu_tanh_backward_bias(dg, x, torch.bfloat16, acc)
    errs = {"dx": rel_err(dx, want), "db": rel_err(acc, want.sum(0))}

    def unfused(i):
        g = bias_grad.gelu_tanh_backward_ref(*sets[i])
        accs[i].add_(g.sum(0))

    op = f"gelu_backward+bias_grad[fc1 {rows}x{n}]"
    torch_ms = gpu_ms(unfused, len(sets))[0]
    ours_ms = gpu_ms(lambda i: bias_grad.gelu_tanh_backward_bias(*sets[i], torch.bfloat16, accs[i]), len(sets))[0]
    res = [_row(op, "torch gelu_backward + sum(0) + add_", torch_ms, nbytes, copy_gbs, ok=True),
           _row(op, "gelu_tanh_backward_bias", ours_ms, nbytes, copy_gbs, ok=max(errs.values()) < 1e-2, errors=errs,
                speedup=torch_ms / ours_ms)]
    if sweep:
        saved = dict(bias_grad.GELU_TUNE)
        for r, c, w, p in itertools.product((8, 16, 32), (64, 128, 256), (4, 8), (2, 4, 8)):
            bias_grad.GELU_TUNE.update(rows=r, cols=c, warps=w, per_sm=p)
            ms = gpu_ms(lambda i: bias_grad.gelu_tanh_backward_bias(*sets[i], torch.bfloat16, accs[i]), len(sets))[0]
            res.append(_row(op, f"sweep rows={r} cols={c} warps={w} per_sm={p}", ms, nbytes, copy_gbs, ok=True))
        bias_grad.GELU_TUNE.update(saved)
    return res


def _grads_bhsd(tiles, patches, heads, d, dev):
    # cuDNN's backward returns dq, dk, dv contiguous [b, heads, s, d]; the model sees [s, b, heads, d]
    return [torch.randn(tiles, heads, patches, d, device=dev, dtype=torch.bfloat16).permute(2, 0, 1, 3)
            for _ in range(3)]


def bench_split(dev, tiles, patches, heads, d, copy_gbs, sweep):
    nbytes = 2 * 3 * tiles * patches * heads * d * 2  # read dq, dk, dv, write d(mixed_qkv)
    sets = [_grads_bhsd(tiles, patches, heads, d, dev) for _ in range(n_sets_for(nbytes))]
    want = torch.cat([t.float() for t in sets[0]], dim=-1)
    err = rel_err(qkv_split.cat_heads(*sets[0], 1).view_as(want), want)
    op = f"qkv_split_backward[{patches}x{tiles}x{heads}x{d}]"
    torch_ms = gpu_ms(lambda i: torch.cat(sets[i], dim=-1), len(sets))[0]
    ours_ms = gpu_ms(lambda i: qkv_split.cat_heads(*sets[i], 1), len(sets))[0]
    res = [_row(op, "torch.cat", torch_ms, nbytes, copy_gbs, ok=True),
           _row(op, "cat_heads", ours_ms, nbytes, copy_gbs, ok=err == 0.0, error=err, speedup=torch_ms / ours_ms)]
    if sweep:
        saved = dict(qkv_split.TUNE)
        for t, h, w in itertools.product((2, 4, 8, 16, 32), (1, 2, 4), (2, 4, 8)):
            qkv_split.TUNE.update(tokens=t, heads=h, warps=w)
            ms = gpu_ms(lambda i: qkv_split.cat_heads(*sets[i], 1), len(sets))[0]
            res.append(_row(op, f"sweep tokens={t} heads={h} warps={w}", ms, nbytes, copy_gbs, ok=True))
        qkv_split.TUNE.update(saved)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1): checks only")
    ap.add_argument("--sweep", action="store_true", help="also time other launch shapes")
    ap.add_argument("--only-gelu", action="store_true", help="the GELU backward rows only (with --sweep: its sweep)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        if not (torch.cuda.is_available() or interpreting()):
            raise SystemExit("--smoke on CPU needs TRITON_INTERPRET=1 (the Triton interpreter)")
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        tiles, patches, heads, d, widths = (SMOKE[k] for k in ("tiles", "patches", "heads", "head_dim", "widths"))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA (or --smoke under TRITON_INTERPRET=1)")
        dev, tiles, patches, heads, d, widths = "cuda", TILES, PATCHES, HEADS, HEAD_DIM, WIDTHS
    copy_gbs = copy_bandwidth(dev) if dev == "cuda" else 0.0
    rows = tiles * patches
    sweep = args.sweep and not args.smoke
    res = []
    if not args.only_gelu:
        res += bench_bias(dev, rows, widths, copy_gbs, sweep)
        res += bench_split(dev, tiles, patches, heads, d, copy_gbs, sweep)
    res += bench_gelu(dev, rows, max(widths.values()), copy_gbs, sweep)
    for r in res:
        print(json.dumps(r))
    best = {}
    for r in res:
        if not r["impl"].startswith("sweep"):
            best.setdefault(r["op"], {})[r["impl"]] = r["ms"]
    if not args.smoke and not args.only_gelu:  # one micro-batch: 27 layers, the four biases and one split each
        def per_mb(impl_of):
            return LAYERS * sum(ms for op, impls in best.items() for impl, ms in impls.items() if impl_of(op, impl))
        torch_ms = per_mb(lambda op, impl: (op.startswith("bias_into") and impl.startswith("torch"))
                          or (op.startswith("qkv") and impl == "torch.cat"))
        ours_ms = per_mb(lambda op, impl: (op.startswith("bias_into") and impl == "column_sum_into_")
                         or (op.startswith("qkv") and impl == "cat_heads"))
        print(f"\nper micro-batch ({LAYERS} layers): torch {torch_ms:.2f} ms, ours {ours_ms:.2f} ms")
    finish_checks(res, args.out)


if __name__ == "__main__":
    main()
