"""The fused output layer + cross-entropy on every position vs on the positions with a loss only.

    python tools/bench/loss_rows_bench.py                      # one GPU: 8192 positions, 2560 x 100352, bf16
    python tools/bench/loss_rows_bench.py --tokens 512 --hidden 64 --vocab 1000 --iters 2 --rounds 1   # CPU
    python tools/bench/loss_rows_bench.py --mm-ab 3 -- <tools/bench/multimodal_bench.py arguments>

Op mode: ``models/fused_loss.fused_output_loss`` forward + backward on one folded micro-batch
([tokens, 1, hidden] hidden states, as the decoder's last stage hands them over) with a multimodal
row's loss mask: spans of ``<image>`` positions (169 per tile, 1-8 tiles) and a prompt without a loss,
then an answer with one, ``--keep`` of the positions in all. "every row": the kernel on all positions,
the masked ones as ignore_index (``step.LOSS_ROWS = False``); "kept rows": the rows from
``training.step.loss_rows`` (the host's indices, copied non-blocking), gathered before the kernel.
The two alternate ``--rounds`` times, ``--iters`` micro-batches each; printed: the median ms per
micro-batch of each, the ratio, CUDA peak memory, and how far the loss and gradients of the two differ
(relative to the largest entry; bf16 grad_W is accumulated chunk by chunk in bf16, so its rounding
differs where the chunks hold other rows).

``--mm-ab ROUNDS``: runs multimodal_bench.py's ``--ab`` with its variants replaced by "all" (loss on the
kept rows) and "no_loss_rows" (every row), rows folded and the ViT fusions on in both: the whole
training step, the same rows replayed by both, medians over rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from bluelm_kernels.transfer import to_device  # noqa: E402
from megatron_bluelm.models.fused_loss import fused_output_loss  # noqa: E402
from megatron_bluelm.training.step import loss_rows  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TILE_TOKENS = 169


def multimodal_mask(tokens: int, keep: float, gen: torch.Generator) -> torch.Tensor:
    """[1, tokens] loss mask of packed image-text records: (<image> tiles + prompt: 0) then (answer: 1),
    the answers sized so that about ``keep`` of the positions carry a loss."""
    mask, pos = torch.zeros(1, tokens), 0
    while pos < tokens:
        masked = (TILE_TOKENS * int(torch.randint(1, 9, (1,), generator=gen))
                  + int(torch.randint(8, 65, (1,), generator=gen)))
        kept = max(1, round(masked * keep / (1 - keep) * float(torch.empty(1).uniform_(0.5, 1.5, generator=gen))))
        mask[0, pos + masked:pos + masked + kept] = 1
        pos += masked + kept
    return mask


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _micro_batch(layer, hidden, labels, mask, host_mask, kept: bool):
    rows = to_device(loss_rows(host_mask), hidden.device) if kept else None
    loss = fused_output_loss(layer, hidden, labels, mask, rows)
    loss.backward()
    return loss.detach()


def _grads(layer, hidden, labels, mask, host_mask, kept: bool):
    hidden.grad, layer.weight.grad = None, None
    loss = _micro_batch(layer, hidden, labels, mask, host_mask, kept)
    return loss.float(), hidden.grad.float(), layer.weight.grad.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def op_bench(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("loss_rows_bench: --device cuda but no CUDA GPU here (use --device cpu at a tiny size)")
    gen = torch.Generator().manual_seed(0)
    host_mask = multimodal_mask(args.tokens, args.keep, gen)
    n_kept = int(host_mask.sum())
    weight = torch.nn.Parameter((torch.randn(args.vocab, args.hidden, generator=gen) * 0.02).to(device, dtype))
    layer = SimpleNamespace(weight=weight, sequence_parallel=False, tp_group=SimpleNamespace(size=lambda: 1))
    hidden = torch.randn(args.tokens, 1, args.hidden, generator=gen).to(device, dtype).requires_grad_()
    labels = torch.randint(args.vocab, (1, args.tokens), generator=gen).to(device)
    mask = host_mask.to(device)
    print(f"fused output layer + CE: {args.tokens} positions ({n_kept} with a loss, {n_kept / args.tokens:.1%}), "
          f"hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, {device.type}; "
          f"{args.rounds} rounds x {args.iters} micro-batches", flush=True)
    every, kept = (_grads(layer, hidden, labels, mask, host_mask, k) for k in (False, True))
    diffs = {"loss": _rel(kept[0], every[0]), "grad_hidden": _rel(kept[1], every[1]),
             "grad_weight": _rel(kept[2], every[2])}
    times = {False: [], True: []}
    peak = {}
    for r in range(args.rounds):
        for k in ((False, True) if r % 2 == 0 else (True, False)):
            _micro_batch(layer, hidden, labels, mask, host_mask, k)  # warm-up of this path
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            for _ in range(args.iters):
                hidden.grad, weight.grad = None, None
                _micro_batch(layer, hidden, labels, mask, host_mask, k)
            _sync(device)
            times[k].append((time.perf_counter() - t) / args.iters * 1e3)
            if device.type == "cuda":
                peak[k] = (torch.cuda.max_memory_allocated() - base) / 2**20
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = f"; peak {peak[False]:.0f} vs {peak[True]:.0f} MiB" if peak else ""
    print(f"every row {med[False]:.3f} ms, kept rows {med[True]:.3f} ms (x{med[False] / med[True]:.2f}, "
          f"{med[False] - med[True]:.3f} ms saved a micro-batch){mem}", flush=True)
    print("kept vs every row, max diff / largest entry: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()),
          flush=True)
    return {"every_row_ms": med[False], "kept_rows_ms": med[True], "kept": n_kept, "diffs": diffs,
            "rounds_ms": {"every_row": times[False], "kept_rows": times[True]}}


def mm_ab(rounds: int, argv: list) -> None:
    """multimodal_bench.py --ab with the loss rows on / off as its two variants."""
    sys.path.insert(0, HERE)
    import multimodal_bench as mmb

    mmb.main([*argv, "--ab", str(rounds), "--ab-variants", "all,no_loss_rows"])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--mm-ab" in argv:
        i = argv.index("--mm-ab")
        if i + 1 >= len(argv) or not argv[i + 1].isdigit() or int(argv[i + 1]) < 1:
            sys.exit("loss_rows_bench: --mm-ab takes a number of rounds >= 1, then -- and multimodal_bench's arguments")
        rest = argv[i + 2:]
        mm_ab(int(argv[i + 1]), rest[1:] if rest[:1] == ["--"] else rest)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="positions per (folded) micro-batch")
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--vocab", type=int, default=100352, help="the output layer's rows (padded vocabulary)")
    ap.add_argument("--keep", type=float, default=0.35, help="fraction of positions with a loss")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--iters", type=int, default=10, help="timed micro-batches per path and round")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of the two paths")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    for name in ("tokens", "hidden", "vocab", "iters", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.keep < 1:
        ap.error(f"--keep must be in (0, 1), got {args.keep}")
    op_bench(args)


if __name__ == "__main__":
    main()
