"""Two passes over gradients at a step's end, megatron-core's way against ours, in one run:

- the per-token normalisation of the fp32 gradient buffers (``training/step.finalize_grads``):
  megatron-core's ``grad_data *= 1 / num_tokens`` (a 0-dim device tensor: a broadcast, unvectorized
  kernel) against ``_foreach_mul_`` with the scale read on the device;
- the fused loss's output-layer weight gradient into ``main_grad`` (``models/fused_loss.py``): autograd's
  ``grad_w * grad_out`` (bf16) then DDP's hook ``main_grad.add_(grad)`` (mixed dtypes) against one
  ``scaled_accumulate_`` pass.

    python tools/bench/grad_passes_bench.py                # CUDA: the 2.9B multimodal model's sizes

GPU time per call (CUDA events, median of 10 after 2 warm-ups), GB/s over the bytes each must move, and
the results checked equal (bit for bit for the scaling; the accumulate to fp32 rounding of the product).
"""
from __future__ import annotations

import argparse
import json

import torch

from bluelm_kernels.bench import finish_checks
from bluelm_kernels.cross_entropy import scaled_accumulate_


def _ms(fn, reps: int = 10) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def scaling(numel: int, dev) -> list:
    buf = torch.randn(numel, device=dev)
    tokens = torch.tensor(21123, dtype=torch.int32, device=dev)
    want = buf.clone()
    want *= 1.0 / tokens
    got = buf.clone()
    torch._foreach_mul_([got], torch.where(tokens > 0, 1.0 / tokens, torch.ones_like(tokens, dtype=torch.float)))
    same = bool(torch.equal(got, want))
    del want, got
    nbytes = 2 * numel * 4

    def megatron():
        buf.mul_(1.0 / tokens)  # ParamAndGradBuffer.scale_gradients: grad_data *= scaling

    def ours():
        torch._foreach_mul_([buf], torch.where(tokens > 0, 1.0 / tokens, torch.ones_like(tokens, dtype=torch.float)))

    rows = []
    for name, fn in (("megatron_scale_gradients", megatron), ("foreach_mul_device_scale", ours)):
        with torch.no_grad():
            buf.fill_(1.0)  # keeps the values finite over the repeats
            ms = _ms(fn)
        rows.append({"pass": "grad_scaling", "impl": name, "gib": numel * 4 / 2**30, "ms": ms,
                     "gbs": nbytes / ms / 1e6, "ok": same})
    return rows


def weight_grad(vocab: int, hidden: int, dev) -> list:
    main = torch.zeros(vocab, hidden, device=dev)
    grad_w = torch.randn(vocab, hidden, device=dev, dtype=torch.bfloat16)
    grad_out = torch.tensor(1.0, device=dev)
    a, b = main.clone(), main.clone()
    a.add_(grad_w * grad_out.to(grad_w.dtype))
    scaled_accumulate_(b, grad_w, grad_out)
    same = bool(torch.equal(a, b))  # grad_out 1: the product is exact in both
    del a, b
    n = vocab * hidden

    def autograd_then_hook():
        main.add_(grad_w * grad_out.to(grad_w.dtype))

    def sink():
        scaled_accumulate_(main, grad_w, grad_out)

    rows = []
    for name, fn, nbytes in (("autograd_product+ddp_hook_add", autograd_then_hook, n * (2 + 2 + 2 + 4 + 4)),
                             ("scaled_accumulate_", sink, n * (2 + 4 + 4))):
        ms = _ms(fn)
        rows.append({"pass": "output_weight_grad", "impl": name, "shape": [vocab, hidden], "ms": ms,
                     "gbs": nbytes / ms / 1e6, "ok": same})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grad-params", type=float, default=2.9e9, help="fp32 gradient elements (the model's)")
    ap.add_argument("--vocab", type=int, default=100_352)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("grad_passes_bench: needs a CUDA device")
    dev = torch.device("cuda")
    rows = scaling(int(args.grad_params), dev)
    torch.cuda.empty_cache()
    rows += weight_grad(args.vocab, args.hidden, dev)
    for r in rows:
        print(json.dumps(r), flush=True)
    print(f"\n{'pass':<20} {'impl':<32}{'ms':>9}{'GB/s':>8}")
    for r in rows:
        print(f"{r['pass']:<20} {r['impl']:<32}{r['ms']:>9.3f}{r['gbs']:>8.0f}")
    finish_checks(rows, args.out)


if __name__ == "__main__":
    main()
