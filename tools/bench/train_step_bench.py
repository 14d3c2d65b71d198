"""Whole train-step benchmark of the BlueLM decoder on one GPU, side by side with HF transformers.

    python tools/bench/train_step_bench.py --preset bluelm-2.5-3b-proxy8 --seq 4096 --backends fused,torch --hf
    python tools/bench/train_step_bench.py --preset bluelm-2.5-3b --optimizer --backends fused

For each variant: tokens/s, model TFLOP/s (models/counting.py formula), MFU against the bf16 matmul
ceiling measured in the same run (and against the datasheet peak), peak memory. "fwd+bwd" times
forward + backward of the training path (megatron-core schedule, DDP gradient buffers) without the
optimizer, the setting of the HF comparison; "--optimizer" adds the distributed-optimizer Adam step
(the full training step). Prints a table last; --out writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from megatron_bluelm.config.loader import load_config  # noqa: E402
from megatron_bluelm.config.validate import validate  # noqa: E402
from megatron_bluelm.models.counting import DecoderShape, train_flops_per_token  # noqa: E402
from megatron_bluelm.training.logging import device_peak_tflops  # noqa: E402


def matmul_ceiling(n: int = 8192, iters: int = 50) -> float:
    """Measured bf16 TFLOP/s of one large square matmul (the practical ceiling)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def random_batches(vocab: int, mbs: int, seq: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (mbs, seq + 1), generator=gen)
        yield {"tokens": x[:, :-1], "labels": x[:, 1:], "loss_mask": torch.ones(mbs, seq),
               "position_ids": torch.arange(seq).expand(mbs, seq).contiguous(), "attention_mask": None}


def _time_steps(step_fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step_fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _ab_wgrad_fusion(model, step, args) -> dict:
    """Step time with the weight-gradient GEMMs accumulating into main_grad (training.fused_wgrad_accumulation)
    and without, alternated in one process on one model (same memory state, clocks and data), each
    round timing ``--steps`` steps of each after one untimed step."""
    fused = [m for chunk in model for m in chunk.modules() if getattr(m, "gradient_accumulation_fusion", False)]
    times = {"fused": [], "unfused": []}
    for _ in range(args.ab_wgrad_fusion):
        for name, on in (("unfused", False), ("fused", True)):
            for m in fused:
                m.gradient_accumulation_fusion = on
            times[name].append(_time_steps(step, 1, args.steps))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"linears": len(fused), "step_s": times, "median_s": med,
            "fused_speedup": med["unfused"] / med["fused"] if med["fused"] else None}


def bench_ours(args, backend: str) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.parallel.setup import setup_parallel
    from megatron_bluelm.training.model_setup import build_model_chunks, build_optimizer, wrap_ddp
    from megatron_bluelm.training.step import configure_model_hooks, make_forward_step, train_step

    overrides = ["--model.preset", args.preset, "--model.vocab_size", str(args.vocab), "--model.backend", backend,
                 "--data.seq_length", str(args.seq), "--data.mock", "true", "--training.micro_batch_size",
                 str(args.mbs), "--training.global_batch_size", str(args.mbs * args.microbatches),
                 "--training.recompute", args.recompute, "--parallel.distributed_optimizer", "true",
                 "--training.train_steps", "1000", "--schedule.warmup_steps", "1"]
    cfg = load_config(None, overrides)
    validate(cfg, world_size=1)
    info = setup_parallel(1, 1, None, 1, cfg.training.seed)
    torch.cuda.reset_peak_memory_stats()
    chunks = build_model_chunks(cfg, lambda **kw: build_decoder(cfg, args.vocab, **kw), info.device)
    model = wrap_ddp(cfg, chunks)
    optimizer, scheduler = build_optimizer(cfg, model)
    configure_model_hooks(model, optimizer)
    data = [random_batches(args.vocab, args.mbs, args.seq)]
    kwargs = dict(num_microbatches=args.microbatches, seq_length=args.seq, micro_batch_size=args.mbs)
    if args.optimizer:
        def step():
            train_step(model, optimizer, scheduler, data, device=info.device, **kwargs)
    else:
        def step():
            for chunk in model:
                chunk.zero_grad_buffer()
            get_forward_backward_func()(forward_step_func=make_forward_step(info.device), data_iterator=data[0],
                                        model=model, forward_only=False, **kwargs)
    dt = _time_steps(step, args.warmup, args.steps)
    result = {"variant": f"ours[{backend}]" + ("+adam" if args.optimizer else ""), "step_s": dt,
              "tokens": args.mbs * args.microbatches * args.seq,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    if args.ab_wgrad_fusion:
        result["wgrad_fusion_ab"] = _ab_wgrad_fusion(model, step, args)
    from megatron_bluelm.parallel.setup import teardown

    teardown()
    return result


def bench_hf(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_bluelm.config.presets import PRESETS

    p = PRESETS[args.preset]
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=p["hidden_size"], intermediate_size=p["ffn_hidden_size"],
                         num_hidden_layers=p["num_layers"], num_attention_heads=p["num_attention_heads"],
                         num_key_value_heads=p["num_query_groups"], max_position_embeddings=args.seq,
                         rms_norm_eps=p["norm_eps"], rope_theta=p["rotary_base"], tie_word_embeddings=False,
                         attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    model.train()
    data = random_batches(args.vocab, args.mbs, args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if args.optimizer else None

    def step():
        for _ in range(args.microbatches):
            b = next(data)
            out = model(input_ids=b["tokens"].cuda(), labels=b["tokens"].cuda())
            out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    dt = _time_steps(step, args.warmup, args.steps)
    return {"variant": "hf-llama-sdpa" + ("+adamw" if args.optimizer else ""), "step_s": dt,
            "tokens": args.mbs * args.microbatches * args.seq,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bluelm-2.5-3b-proxy8")
    ap.add_argument("--vocab", type=int, default=100_000)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--recompute", default="none")
    ap.add_argument("--backends", default="fused,torch")
    ap.add_argument("--hf", action="store_true", help="also time HF transformers Llama (SDPA) on the same shapes")
    ap.add_argument("--optimizer", action="store_true", help="include the optimizer step")
    ap.add_argument("--ab-wgrad-fusion", type=int, default=0, metavar="ROUNDS",
                    help="also alternate steps with and without training.fused_wgrad_accumulation, ROUNDS times")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("train_step_bench needs a CUDA GPU")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from megatron_bluelm.config.presets import PRESETS

    p = PRESETS[args.preset]
    shape = DecoderShape(p["num_layers"], p["hidden_size"], p["ffn_hidden_size"], p["num_attention_heads"],
                         p["num_query_groups"], args.vocab)
    flops_tok = train_flops_per_token(shape, args.seq)
    ceiling = matmul_ceiling()
    peak = device_peak_tflops(None)
    results = []
    variants = [("ours", b) for b in args.backends.split(",") if b] + ([("hf", None)] if args.hf else [])
    for kind, backend in variants:
        try:
            r = bench_ours(args, backend) if kind == "ours" else bench_hf(args)
        except torch.cuda.OutOfMemoryError as e:
            r = {"variant": f"{kind}[{backend}]", "error": f"OOM: {str(e)[:120]}"}
        gc.collect()
        torch.cuda.empty_cache()
        if "step_s" in r:
            tps = r["tokens"] / r["step_s"]
            r.update(tokens_per_s=tps, tflops=tps * flops_tok / 1e12)
            r.update(mfu_vs_matmul=r["tflops"] / ceiling, mfu_vs_peak=(r["tflops"] / peak) if peak else None)
        results.append(r)
        print(json.dumps(r), flush=True)
    hf = next((r for r in results if r["variant"].startswith("hf") and "tflops" in r), None)
    print(f"\n{args.preset}, seq {args.seq}, mbs {args.mbs} x {args.microbatches} micro-batches, "
          f"{'with' if args.optimizer else 'no'} optimizer; {torch.cuda.get_device_name()}; "
          f"bf16 matmul ceiling {ceiling:.0f} TFLOP/s; model FLOPs/token {flops_tok / 1e9:.2f} G")
    print(f"{'variant':<24}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU(ceil)':>11}{'MFU(peak)':>11}{'vs HF':>8}{'mem GiB':>9}")
    for r in results:
        if "tflops" not in r:
            print(f"{r['variant']:<24} {r.get('error')}")
            continue
        vs = f"{r['tflops'] / hf['tflops']:.2f}x" if hf else "-"
        mp = f"{r['mfu_vs_peak']:.1%}" if r["mfu_vs_peak"] else "-"
        print(f"{r['variant']:<24}{r['tokens_per_s']:>12,.0f}{r['tflops']:>10.1f}{r['mfu_vs_matmul']:>11.1%}"
              f"{mp:>11}{vs:>8}{r['peak_mem_gib']:>9.1f}")
    for r in results:
        ab = r.get("wgrad_fusion_ab")
        if ab:
            print(f"{r['variant']}: weight gradients into main_grad (fused) vs bf16 gradient + add (unfused), "
                  f"{ab['linears']} linears, median of {args.ab_wgrad_fusion} alternating rounds: "
                  f"{ab['median_s']['fused'] * 1e3:.1f} vs {ab['median_s']['unfused'] * 1e3:.1f} ms per step "
                  f"({ab['fused_speedup']:.3f}x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "ceiling_tflops": ceiling, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
