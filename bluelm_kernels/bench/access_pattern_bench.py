"""The bandwidth ceiling of the RMSNorm backward's access pattern, beside our kernel.

The plain RMSNorm backward reads two [M, H] bf16 tensors (s, dy) and writes one (dx). This script
times passes with exactly that traffic and no reductions, so the gap between them and our kernel
is what the per-row reduction and the dW accumulation cost:

    python -m bluelm_kernels.bench.access_pattern_bench [--rows 8192 --hidden 2560]    # CUDA only

Printed: GPU time per call (bluelm_kernels/bench/bench_kernels.gpu_ms: queued calls, host excluded,
inputs rotating over > 3x L2) and GB/s of the bytes moved.
"""

import argparse
import sys

import torch

from bluelm_kernels._triton import tl, triton
from bluelm_kernels.bench.bench_kernels import gpu_ms


@triton.jit
def _mul_rows(A, B, C, H, BLOCK: tl.constexpr):
    # one row per program: c = a * b
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < H
    a = tl.load(A + r * H + c, mask=m)
    b = tl.load(B + r * H + c, mask=m)
    tl.store(C + r * H + c, a * b, mask=m)


@triton.jit
def _mul_rows_persistent(A, B, C, M, H, BLOCK: tl.constexpr):
    # grid-stride over rows, as the RMSNorm backward walks them
    c = tl.arange(0, BLOCK)
    m = c < H
    for r in range(tl.program_id(0), M, tl.num_programs(0)):
        r64 = r.to(tl.int64)
        a = tl.load(A + r64 * H + c, mask=m)
        b = tl.load(B + r64 * H + c, mask=m)
        tl.store(C + r64 * H + c, a * b, mask=m)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=2560)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("access_pattern_bench needs a CUDA device")
    rm = sys.modules["bluelm_kernels.rmsnorm"]  # the module (bluelm_kernels.rmsnorm is the function)
    m, h, n = args.rows, args.hidden, 4
    block = triton.next_power_of_2(h)
    sets = [[torch.randn(m, h, device="cuda", dtype=torch.bfloat16) for _ in range(3)] for _ in range(n)]
    nbytes = 3 * m * h * 2
    print(f"{torch.cuda.get_device_name()}: 2 reads + 1 write of {m}x{h} bf16 = {nbytes / 1e6:.0f} MB")

    def report(name, t, moved=nbytes):
        print(f"{name:<44} {t[0] * 1e3:8.1f} us  {moved / t[0] / 1e6:7.0f} GB/s", flush=True)

    big = [torch.empty(2**29, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    report("copy 1 GiB -> 1 GiB", gpu_ms(lambda i: big[1].copy_(big[0]), 1, reps=5), 2 * 2**30)
    big.clear()
    report("torch.mul(a, b, out=c)", gpu_ms(lambda i: torch.mul(sets[i][0], sets[i][1], out=sets[i][2]), n))
    for w in (4, 8):
        report(f"triton c = a * b, 1 row/program, {w} warps",
               gpu_ms(lambda i, w=w: _mul_rows[(m,)](*sets[i], h, BLOCK=block, num_warps=w), n))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for per in (2, 4, 8):
        report(f"triton c = a * b, persistent {per}/SM, 8 warps",
               gpu_ms(lambda i, per=per: _mul_rows_persistent[(per * sms,)](*sets[i], m, h, BLOCK=block,
                                                                              num_warps=8), n))
    w = torch.ones(h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xs = [s[0].clone().requires_grad_() for s in sets]
    ys = [rm.rmsnorm(x, w) for x in xs]
    report("ours: rmsnorm backward (dx and dW)",
           gpu_ms(lambda i: torch.autograd.grad(ys[i], (xs[i], w), sets[i][1], retain_graph=True), n))


if __name__ == "__main__":
    main()
