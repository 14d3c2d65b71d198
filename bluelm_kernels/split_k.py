"""Split-K matmuls for few-row decode steps: ``x @ w.T`` as P fp32 partials over K.

At one to a few rows a matmul reads the whole weight for almost no arithmetic, so its speed is the
weight's read bandwidth. cuBLAS gives a 2560 x 2560 product about 40 thread blocks on the H200's
132 SMs (one per 64 output columns) and reads it at ~1.9 TB/s; split over K into P independent
products (one batched GEMM over strided views of the same weight: no copy), it has P times the
blocks. The P partials come back in fp32 and their consumer sums them (``rmsnorm_partials``,
``swiglu_partials``): no reduction kernel, and the sum rounded once to the activation dtype is what
the unsplit product would have written, up to the fp32 summation order.

H200, batch 1, every layer's weights (``python -m bluelm_kernels.bench.split_k_bench``,
``bluelm_kernels/bench/results/split_k_matmul_h200.log``): proj 2560x2560 6.95 -> 6.10 us (P=4), fc2
2560x6912 13.2 -> 11.6 us (P=4; cuBLAS splits it already but adds a reduction kernel), fc1 13824x2560
20.0 -> 19.4 us (P=2); qkv 3584x2560 gains ~3% and stays unsplit. At 256 rows the partials would cost
more bytes than the product saves: ``TUNE['max_rows']``.
"""

import torch

# splits per product (1: plain matmul) and the largest row count that uses them (measured at 1 and 8)
TUNE = {"qkv": 1, "proj": 4, "fc1": 2, "fc2": 4, "max_rows": 8}


def splits_for(name: str, rows: int, k: int) -> int:
    """Splits of product ``name`` at ``rows`` rows and inner size ``k`` (1 = unsplit): the tuned
    count where it divides K into pieces of whole 16-byte vectors."""
    s = TUNE[name] if rows <= TUNE["max_rows"] else 1
    return s if s > 1 and k % s == 0 and (k // s) % 8 == 0 else 1


def partials(x: torch.Tensor, w: torch.Tensor, splits: int) -> torch.Tensor:
    """x [M, K] @ w[N, K].T as ``splits`` fp32 partial products over K: [splits, M, N]."""
    m, k = x.shape
    n = w.shape[0]
    if k % splits or w.shape[1] != k:
        raise ValueError(f"split_k.partials: x {tuple(x.shape)}, w {tuple(w.shape)}, {splits} splits: "
                         "K must match and divide by the splits")
    if not (x.is_contiguous() and w.is_contiguous()):
        raise ValueError("split_k.partials: x and w must be contiguous (the splits are strided views)")
    xs = x.view(m, splits, k // splits).transpose(0, 1)  # [P, M, K/P]
    ws = w.view(n, splits, k // splits).permute(1, 2, 0)  # [P, K/P, N], a view of w
    if x.dtype == torch.float32:
        return torch.bmm(xs, ws)
    if x.is_cuda:
        return torch.bmm(xs, ws, out_dtype=torch.float32)  # bf16 inputs, fp32 accumulate and output
    return torch.bmm(xs.float(), ws.float())  # CPU (tests): no mixed-dtype bmm there
