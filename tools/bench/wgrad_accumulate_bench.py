"""Weight-gradient GEMM + accumulation into an fp32 main gradient, fused vs unfused (one GPU).

    python tools/bench/wgrad_accumulate_bench.py [--shapes 4096x13824x2560,...]

For the 2.44B decoder's and the so400m ViT's linear shapes ([tokens, out]^T x [tokens, in]): the time
of ``training.model_setup.wgrad_accumulate`` (one cuBLAS GEMM with bf16 inputs whose fp32 epilogue adds
into main_grad: what ``training.fused_wgrad_accumulation`` runs) against megatron-core's unfused path
without Apex (a bf16 gradient GEMM, then ``main_grad.add_``), and the bf16 GEMM alone; and each one's
largest error against an fp32 reference (the unfused path rounds every micro-batch's gradient to bf16).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from megatron_bluelm.training.model_setup import wgrad_accumulate  # noqa: E402

# tokens x out x in: bluelm-2.5-3b's fc1 (gate + up), fc2, qkv, proj at 4096 tokens; so400m's fc1, fc2 at
# 16 tiles of 676 patches
SHAPES = "4096x13824x2560,4096x2560x6912,4096x3584x2560,4096x2560x2560,10816x4304x1152,10816x1152x4304"


def _ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated TOKENSxOUTxIN")
    args = ap.parse_args(argv)
    try:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
        assert all(len(s) == 3 for s in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--shapes {args.shapes!r}: expected comma-separated TOKENSxOUTxIN, e.g. 4096x2560x2560")
    if not torch.cuda.is_available():
        sys.exit("wgrad_accumulate_bench needs a CUDA GPU")
    torch.manual_seed(0)
    for tok, out, inp in shapes:
        print(_one_shape(tok, out, inp), flush=True)


def _one_shape(tok: int, out: int, inp: int) -> str:
    g = torch.randn(tok, out, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tok, inp, device="cuda", dtype=torch.bfloat16)
    main_grad = torch.randn(out, inp, device="cuda", dtype=torch.float32)
    ref = main_grad + g.float().t() @ x.float()
    fused, unfused = main_grad.clone(), main_grad.clone()
    wgrad_accumulate(x, g, fused)
    unfused.add_(g.t() @ x)
    e_fused, e_unfused = (float((t - ref).abs().max() / ref.abs().max()) for t in (fused, unfused))
    t_fused = _ms(lambda: wgrad_accumulate(x, g, fused))
    t_unfused = _ms(lambda: unfused.add_(g.t() @ x))
    t_mm = _ms(lambda: g.t() @ x)
    flop = 2 * tok * out * inp
    return (f"{tok}x{out}x{inp}: fused {t_fused:.3f} ms ({flop / t_fused / 1e9:.0f} TFLOP/s, err {e_fused:.1e}), "
            f"unfused {t_unfused:.3f} ms (err {e_unfused:.1e}), bf16 GEMM alone {t_mm:.3f} ms "
            f"({flop / t_mm / 1e9:.0f} TFLOP/s); fused / unfused time {t_fused / t_unfused:.2f}")

if __name__ == "__main__":
    main()
