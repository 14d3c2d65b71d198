"""The decoder's token-embedding weight gradient per micro-batch: the dense path vs rows into main_grad.

    python tools/bench/embedding_grad_bench.py                      # one GPU: 100000 x 2560, 8192 tokens, bf16
    python tools/bench/embedding_grad_bench.py --vocab 2000 --hidden 64 --tokens 512 --iters 3   # CPU, tiny

Per micro-batch: the lookup's forward and backward, then what megatron-core DDP's backward hook does
with the weight's ``.grad`` (``main_grad.add_(grad)`` unless ``grad_added_to_main_grad``):

* dense: ``F.embedding``, whose backward (``embedding_dense_backward``) writes a zero-filled
  ``[vocab, hidden]`` gradient in the parameter dtype with the rows scattered in, which the hook adds
  into the fp32 ``main_grad``;
* rows: ``models/embedding.py``'s lookup without host tokens, whose backward adds the micro-batch's
  rows into ``main_grad`` in fp32 on the device (``accumulate_rows``: sorted, deterministic);
* compact: the same lookup with the micro-batch's ids known on the host (what training registers):
  the distinct ids found there (``compact_rows``, timed with the micro-batch), the backward summing
  into a ``[distinct ids, hidden]`` gradient and adding it at those rows.

Both new paths leave an uninitialized placeholder ``.grad`` that the hook drops. Printed side by side
for uniform and Zipf-distributed token ids: ms per micro-batch, peak memory above the weight and
main_grad (CUDA), and the largest difference of each new path's main_grad from the dense path's
after the timed micro-batches, relative to its largest entry (0 in fp32 on the CPU, where the
additions are the same).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from megatron_bluelm.models.embedding import _LookupIntoMainGrad, compact_rows  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ddp_hook(weight: torch.Tensor) -> None:
    """megatron-core DDP's backward post hook, its gradient part."""
    if weight.grad is not None and not weight.grad_added_to_main_grad:
        weight.main_grad.add_(weight.grad.data)
    weight.grad = None


PATHS = ("dense", "rows", "compact")


def _micro_batch(weight, ids, host_ids, dy, path: str) -> None:
    weight.grad_added_to_main_grad = False  # DDP resets it every step
    if path == "dense":
        out = F.embedding(ids, weight)
    elif path == "rows":
        out = _LookupIntoMainGrad.apply(ids, weight)
    else:
        slot, rows, width = compact_rows(host_ids, 0, weight.shape[0])
        out = _LookupIntoMainGrad.apply(ids, weight, slot.to(ids.device, non_blocking=True),
                                        rows.to(ids.device, non_blocking=True), width)
    out.backward(dy)
    _ddp_hook(weight)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(weight, ids, host_ids, dy, path: str, iters: int) -> tuple[float, float | None]:
    """(ms per micro-batch, peak MiB above what was allocated before; None off CUDA)."""
    device = weight.device
    _micro_batch(weight, ids, host_ids, dy, path)  # warm-up (allocator, kernels)
    _sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _micro_batch(weight, ids, host_ids, dy, path)
        _sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    t = time.perf_counter()
    for _ in range(iters):
        _micro_batch(weight, ids, host_ids, dy, path)
    _sync(device)
    return (time.perf_counter() - t) / iters * 1e3, peak


def _ids(kind: str, vocab: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.randint(vocab, (tokens,), generator=gen)
    # Zipf (s = 1.1) over a shuffled vocabulary: a few ids repeat hundreds of times, as in text
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    ranks = torch.multinomial(probs, tokens, replacement=True, generator=gen)
    return torch.randperm(vocab, generator=gen)[ranks]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=100_000)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="parameter dtype (main_grad is fp32)")
    ap.add_argument("--iters", type=int, default=20, help="timed micro-batches per path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    for name in ("vocab", "hidden", "tokens", "iters"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("embedding_grad_bench: --device cuda but no CUDA GPU here (use --device cpu at a tiny size)")
    print(f"embedding {args.vocab} x {args.hidden} {args.dtype}, {args.tokens} tokens per micro-batch, "
          f"{args.iters} micro-batches, {device.type}", flush=True)
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(args.vocab, args.hidden, generator=gen) * 0.02).to(device, dtype))
    for kind in ("uniform", "zipf"):
        host_ids = _ids(kind, args.vocab, args.tokens, gen)
        ids = host_ids.to(device)
        dy = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
        ms, peak, main = {}, {}, {}
        for path in PATHS:
            weight.main_grad = torch.zeros(args.vocab, args.hidden, device=device, dtype=torch.float32)
            ms[path], peak[path] = _measure(weight, ids, host_ids, dy, path, args.iters)
            main[path] = weight.main_grad
        scale = main["dense"].abs().max().clamp_min(1e-30)
        err = {p: float((main[p] - main["dense"]).abs().max() / scale) for p in PATHS[1:]}
        times = ", ".join(f"{p} {ms[p]:.3f} ms" + ("" if p == "dense" else f" (x{ms['dense'] / ms[p]:.2f})")
                          for p in PATHS)
        mem = "" if peak["dense"] is None else "; peak " + " / ".join(f"{peak[p]:.0f}" for p in PATHS) + " MiB"
        diffs = ", ".join(f"{p} {err[p]:.1e}" for p in PATHS[1:])
        print(f"{kind:>7} ids ({host_ids.unique().numel()} distinct): {times}{mem}; main_grad max diff from "
              f"dense: {diffs} of its largest entry", flush=True)


if __name__ == "__main__":
    main()
