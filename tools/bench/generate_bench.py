"""Generation throughput of the engine on one GPU, side by side with HF transformers' generate.

    python tools/bench/generate_bench.py                        # the full table (H200: ~8 min)
    python tools/bench/generate_bench.py --cases 256x128x256 --hf dynamic,static
    python tools/bench/generate_bench.py --preset tiny --cases 4x16x16 --hf none     # CPU smoke run

The full ``bluelm-2.5-3b`` decoder with random weights (bf16), prompts of random token ids, no stop
tokens in the fixed-length cases (every sample generates exactly ``new`` tokens), greedy decoding.
Cases are BATCHxPROMPTxNEW. The mixed workload (``--mixed N``) has N thinking-mode samples with
per-sample budgets drawn log-uniformly from 64..4096 (forced close at the budget) and answers of
16..256 tokens (per-sample max_new_tokens), with the real stop tokens set; it runs through the same
slots as the fixed-length batch-256 case and is compared with it. ``--prompt-mix LO..HI`` prefills
prompts of mixed lengths in packed rows and in right-padded rows (same engine, same prompts) and
compares the prefill's GPU time, tokens computed per useful token and the outputs.

Per case: tokens/s (generated tokens over wall time, prefill included), ms per decode step, the
roofline: bytes a decode step must read (all weights but the embedding table's unused rows, plus
every row's cached keys and values at the case's mean context) over the copy bandwidth measured in
this run, and the GPU's busy fraction (GPU time of the decode bursts over wall time).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from bluelm_kernels.bench import graph_ms  # noqa: E402
from megatron_bluelm.config.loader import load_config  # noqa: E402
from megatron_bluelm.inference.generate import GenerationRequest, SpecialIds, generate_ids, make_engine  # noqa: E402
from megatron_bluelm.inference.model import build_inference_model  # noqa: E402

VOCAB = 100_000
THINK, END_THINK, PAD = 4, 5, 0
STOPS = [3, 13]  # </s>, <|end|> in our tokenizers
NEWLINE = 8112  # the forced close of a random model: "\n</think>\n" stand-ins


def copy_bandwidth(device) -> float:
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(1 << 29, dtype=torch.float16, device=device)  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 2 * 20 / (time.perf_counter() - t)


def weight_bytes(model, batch: int) -> int:
    total = 0
    for name, p in model.named_parameters():
        if "word_embeddings" in name:
            total += batch * p.shape[1] * p.element_size()  # a lookup reads only the batch's rows
        else:
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(cfg) -> int:
    m = cfg.model
    return 2 * m.num_layers * m.num_query_groups * (m.hidden_size // m.num_attention_heads) * 2


def run_ours(engine, im, batch, prompt, new, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, VOCAB) for _ in range(prompt)] for _ in range(batch)]
    req = GenerationRequest(max_new_tokens=new)
    kw = dict(ids=SpecialIds(PAD, THINK, END_THINK), vocab_size=VOCAB, max_context=im.max_context)
    t0 = time.perf_counter()
    engine.reserve(batch, prompt + new, new, VOCAB)  # cache and graphs ready before the clock starts
    _sync(im)
    reserve_s = time.perf_counter() - t0
    # warm-up: the same prompt shapes for a few tokens (prefill kernels compiled and cuBLAS / the
    # few-row products' launch shapes chosen) on other prompts, so the timed call is a steady state
    warm = [[rng.randrange(10, VOCAB) for _ in range(prompt)] for _ in range(batch)]
    generate_ids(engine, warm, GenerationRequest(max_new_tokens=min(new, 2 * engine.check_every)), **kw)
    _sync(im)
    cuda = im.info.device.type == "cuda"
    if cuda:
        engine.gpu_decode_seconds(), engine.gpu_prefill_seconds()
    steps0 = engine.stats["decode_steps"]
    t = time.perf_counter()
    outs = generate_ids(engine, prompts, req, **kw)
    _sync(im)
    wall = time.perf_counter() - t
    gpu = engine.gpu_decode_seconds() if cuda else float("nan")
    prefill = engine.gpu_prefill_seconds() if cuda else float("nan")
    tokens = sum(len(o.tokens) for o in outs)
    return {"tok_s": tokens / wall, "wall_s": wall, "tokens": tokens, "prefill_s": prefill, "reserve_s": reserve_s,
            "ms_per_step": 1e3 * gpu / max(1, engine.stats["decode_steps"] - steps0), "busy": gpu / wall}


def attention_time(im, batch: int, length: int) -> list:
    """The decode-attention kernel alone over every layer (rows at ``length`` keys): ms, GB/s."""
    from megatron_bluelm.inference.attention import decode_attention, num_splits

    m = im.cfg.model
    d, groups, layers = m.hidden_size // m.num_attention_heads, m.num_query_groups, m.num_layers
    k = torch.randn(batch, groups, length, d, device=im.info.device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, m.num_attention_heads, d, device=k.device, dtype=k.dtype)
    lengths = torch.full((batch,), length, device=k.device)
    splits = num_splits(batch, groups, length, k.device)
    ms = graph_ms(lambda: [decode_attention(q, k, v, lengths, splits) for _ in range(layers)])
    return [round(ms, 3), round(2 * k.numel() * 2 * layers / (ms / 1e3) / 1e9)]


def sampling_time(batch: int, device) -> dict:
    """decode_state.advance alone on [batch, 100k] logits, per sampler mode."""
    from megatron_bluelm.inference.decode_state import DecodeState, advance

    st = DecodeState(batch, 64, 100352, device)
    st.active.fill_(True)
    st.limit.fill_(1 << 30)
    st.temperature.fill_(1.0)
    logits = torch.randn(batch, 100352, device=device)
    return {mode: round(graph_ms(lambda m=mode: advance(st, logits, batch, m)), 3) for mode in ("greedy", "sample")}


def matmul_floor(im, batch: int, iters: int = 50) -> float:
    """ms per step of the decode step's matmuls alone (every layer's four + the output layer, at
    ``batch`` rows, one CUDA graph): what the weights cost without the rest of the step."""
    from megatron_bluelm.inference.stage import StageWeights

    w = StageWeights(im.model)
    x = torch.randn(batch, w.hidden, device=im.info.device, dtype=w.dtype)
    mats = [m for lw in w.layers for m in (lw.qkv, lw.proj, lw.fc1, lw.fc2)] + [w.output]
    ins = [torch.randn(batch, m.shape[1], device=x.device, dtype=w.dtype) for m in mats]

    def step():
        for a, m in zip(ins, mats):
            a @ m.t()

    return graph_ms(step, iters)


def run_mixed(engine, im, n, seed=0):
    rng = random.Random(seed)
    prompts, budgets, max_new = [], [], []
    for _ in range(n):
        prompts.append([rng.randrange(10, VOCAB) for _ in range(128)] + [THINK])
        b = int(math.exp(rng.uniform(math.log(64), math.log(4096))))
        budgets.append(b)
        max_new.append(b + 3 + rng.randint(16, 256))
    req = GenerationRequest(max_new_tokens=max_new, thinking_budget=budgets, stop_token_ids=STOPS,
                            close_ids=[NEWLINE, END_THINK, NEWLINE])
    kw = dict(ids=SpecialIds(PAD, THINK, END_THINK), vocab_size=VOCAB, max_context=im.max_context)
    engine.reserve(n, 129 + max(max_new), max(max_new), VOCAB)
    _sync(im)
    engine.gpu_decode_seconds()
    engine.gpu_prefill_seconds()
    t = time.perf_counter()
    outs = generate_ids(engine, prompts, req, **kw)
    _sync(im)
    wall = time.perf_counter() - t
    gpu = engine.gpu_decode_seconds() if im.info.device.type == "cuda" else float("nan")
    tokens = sum(len(o.tokens) for o in outs)
    over = sum(o.thinking_tokens > b for o, b in zip(outs, budgets))
    return {"tok_s": tokens / wall, "wall_s": wall, "tokens": tokens, "busy": gpu / wall,
            "prefill_s": engine.gpu_prefill_seconds(), "mean_len": tokens / n, "budget_violations": over}


def run_prompt_mix(engine, im, n, lo, hi, new, seed=0) -> dict:
    """``n`` prompts of lengths drawn log-uniformly from lo..hi, ``new`` greedy tokens each, prefilled
    in packed rows and in right-padded rows (``pack_prefill``; same engine, cache and prompts), each
    after an untimed pass over other prompts of the same lengths (FlexAttention compiled for the row
    shapes). Per mode: GPU seconds of the prefill, prompt tokens per prefill second, the tokens the
    prefill computed over the useful ones, wall tok/s; and the largest log-prob difference between
    the two modes with the share of equal tokens (bf16: other kernels round differently)."""
    rng = random.Random(seed)
    lengths = [int(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for _ in range(n)]
    prompts, warm = ([[rng.randrange(10, VOCAB) for _ in range(L)] for L in lengths] for _ in range(2))
    req = GenerationRequest(max_new_tokens=new)
    kw = dict(ids=SpecialIds(PAD, THINK, END_THINK), vocab_size=VOCAB, max_context=im.max_context)
    engine.reserve(n, max(lengths) + new, new, VOCAB)
    cuda = im.info.device.type == "cuda"
    res, outs = {}, {}
    for mode in ("packed", "padded"):
        engine.pack_prefill = mode == "packed"
        generate_ids(engine, warm, req, **kw)
        _sync(im)
        if cuda:
            engine.gpu_decode_seconds(), engine.gpu_prefill_seconds()
        s0 = dict(engine.stats)
        t = time.perf_counter()
        outs[mode] = generate_ids(engine, prompts, req, **kw)
        _sync(im)
        wall = time.perf_counter() - t
        prefill = engine.gpu_prefill_seconds() if cuda else float("nan")
        useful = engine.stats["prefill_tokens"] - s0["prefill_tokens"]
        computed = engine.stats["prefill_computed"] - s0["prefill_computed"]
        tokens = sum(len(o.tokens) for o in outs[mode])
        res[mode] = {"tok_s": tokens / wall, "wall_s": wall, "tokens": tokens, "prefill_s": prefill,
                     "prefill_tok_s": useful / prefill if cuda else float("nan"), "prompt_tokens": useful,
                     "computed_over_useful": computed / useful, "prefill_calls": engine.stats["prefill_calls"]
                     - s0["prefill_calls"]}
    engine.pack_prefill = True
    pairs = [(a, b) for x, y in zip(outs["packed"], outs["padded"]) for a, b in zip(x.logprobs, y.logprobs)]
    same = [a == b for x, y in zip(outs["packed"], outs["padded"]) for a, b in zip(x.tokens, y.tokens)]
    res["packed_vs_padded"] = {"max_abs_logprob_diff": max(abs(a - b) for a, b in pairs),
                               "equal_tokens": sum(same) / len(same)}
    if cuda:
        res["prefill_speedup"] = res["padded"]["prefill_s"] / res["packed"]["prefill_s"]
    return res


def check_against_reference(engine, im, prompts=4, new=32) -> dict:
    """The engine's greedy tokens and log-probs (graphs, decode kernel) against the model's own
    forward (megatron-core, no cache) over prompt + those tokens: the largest log-prob difference,
    and the share of steps where the engine's token is also the forward's argmax (random weights
    have near-flat logits, so bf16 rounding can swap near-ties)."""
    rng = random.Random(1)
    ps = [[rng.randrange(10, VOCAB) for _ in range(rng.randint(5, 60))] for _ in range(prompts)]
    kw = dict(ids=SpecialIds(PAD, THINK, END_THINK), vocab_size=VOCAB, max_context=im.max_context)
    ours = generate_ids(engine, ps, GenerationRequest(max_new_tokens=new), **kw)
    worst, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for p, o in zip(ps, ours):
            seq = torch.tensor([p + o.tokens], device=im.info.device)
            logits = im.model(seq, torch.arange(seq.shape[1], device=seq.device)[None], None)
            logp = logits[0, len(p) - 1:-1, :VOCAB].float().log_softmax(-1)
            ref = logp.gather(1, torch.tensor(o.tokens, device=seq.device)[:, None]).squeeze(1)
            worst = max(worst, float((ref - torch.tensor(o.logprobs, device=seq.device)).abs().max()))
            agree += int((logp.argmax(-1) == torch.tensor(o.tokens, device=seq.device)).sum())
            total += len(o.tokens)
    return {"max_abs_logprob_diff": worst, "argmax_agreement": agree / total}


def ab_split_k(engine, im, rounds: int) -> dict:
    """ms per decode step with and without the split-K products, alternating (the order flips every
    round), the graphs released and recaptured at every switch: {case: {"split": [...], "plain": [...]}}."""
    from bluelm_kernels import split_k

    on = dict(split_k.TUNE)
    off = dict(on, proj=1, fc1=1, fc2=1)
    out: dict = {}
    try:
        for rnd in range(rounds):
            order = (("plain", off), ("split", on)) if rnd % 2 == 0 else (("split", on), ("plain", off))
            for name, tune in order:
                split_k.TUNE.update(tune)
                engine.release()
                for case in ((1, 128, 256), (8, 128, 256)):
                    r = run_ours(engine, im, *case)
                    key = "x".join(map(str, case))
                    out.setdefault(key, {"split": [], "plain": []})[name].append(round(r["ms_per_step"], 4))
                    print(f"split-K A/B round {rnd} {name} {key}: {r['ms_per_step']:.4f} ms/step, "
                          f"{r['tok_s']:.0f} tok/s", flush=True)
    finally:
        split_k.TUNE.update(on)
        engine.release()
    return out


def run_hf(kind, cfg, batch, prompt, new, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                         num_key_value_heads=m.num_query_groups, max_position_embeddings=prompt + new + 8,
                         rope_theta=m.rotary_base, tie_word_embeddings=False)
    model = LlamaForCausalLM(hf_cfg).to(device, torch.bfloat16).eval()
    ids = torch.randint(10, VOCAB, (batch, prompt), device=device)
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    if kind == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        model.generate(ids[:, :16], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        _sync_dev(device)
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        _sync_dev(device)
    wall = time.perf_counter() - t
    tokens = (out.shape[1] - prompt) * batch
    del model
    torch.cuda.empty_cache()
    return {"tok_s": tokens / wall, "wall_s": wall, "ms_per_step": 1e3 * wall / new}


def _sync(im):
    _sync_dev(im.info.device)


def _sync_dev(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bluelm-2.5-3b")
    ap.add_argument("--cases", default="1x128x256,32x128x256,256x128x256,1x1024x256,32x1024x256,256x1024x256,"
                                       "1x128x2048,32x128x2048,256x128x2048")
    ap.add_argument("--hf", default="dynamic,static", help="comma list of dynamic,static or none")
    ap.add_argument("--hf-cases", default="1x128x256,256x128x256")
    ap.add_argument("--mixed", type=int, default=512, help="samples of the mixed workload (0: skip)")
    ap.add_argument("--prompt-mix", default=None, metavar="LO..HI",
                    help="packed vs right-padded prefill on prompts of lengths log-uniform in LO..HI")
    ap.add_argument("--mix-samples", type=int, default=256, help="prompts of the --prompt-mix case")
    ap.add_argument("--mix-new", type=int, default=32, help="new tokens per prompt in the --prompt-mix case")
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--check", action="store_true", help="first compare greedy tokens with the reference loop")
    ap.add_argument("--small-prefill-tokens", type=int, default=None,
                    help="the engine's small_prefill_tokens (graph-captured small prefills; 0: off; default: the "
                         "engine's)")
    ap.add_argument("--ab-split-k", type=int, default=0, metavar="ROUNDS",
                    help="alternate the 1x128x256 and 8x128x256 cases with and without the split-K decode "
                         "products (bluelm_kernels.split_k), ROUNDS times, graphs recaptured for each")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    mix = None
    if a.prompt_mix:
        try:
            mix = tuple(int(v) for v in a.prompt_mix.split(".."))
            assert len(mix) == 2 and 1 <= mix[0] <= mix[1]
        except (ValueError, AssertionError):
            ap.error(f"--prompt-mix: expected LO..HI with 1 <= LO <= HI, got {a.prompt_mix!r}")
        if mix[1] + a.mix_new > a.context:
            ap.error(f"--prompt-mix: prompts up to {mix[1]} + {a.mix_new} new tokens exceed --context {a.context}")

    cfg = load_config(None, ["--model.preset", a.preset, "--data.seq_length", str(a.context),
                             "--model.backend", "torch", "--training.precision",
                             "bf16" if torch.cuda.is_available() else "fp32"])
    im = build_inference_model(cfg, VOCAB)
    device = im.info.device
    engine = make_engine(im.model, device, max_slots=a.slots, small_prefill_tokens=a.small_prefill_tokens)
    engine.timing = True
    if a.check:
        print("check vs reference loop:", json.dumps(check_against_reference(engine, im)), flush=True)
    if device.type == "cuda":
        print("matmul-only ms/step:", json.dumps({b: round(matmul_floor(im, b), 3) for b in (1, 32, 256)}), flush=True)
        print("decode attention ms/step (all layers) and GB/s:",
              json.dumps({f"{b}x{L}": attention_time(im, b, L) for b, L in ((1, 384), (256, 256), (256, 1152))}),
              flush=True)
        print("sampling + state ms/step:", json.dumps({b: sampling_time(b, device) for b in (1, 256)}), flush=True)
    ab = ab_split_k(engine, im, a.ab_split_k) if a.ab_split_k else None
    bw = copy_bandwidth(device)
    kv_tok = kv_bytes_per_token(im.cfg)
    rows = []
    for case in filter(None, a.cases.split(",")):
        b, p, n = map(int, case.split("x"))
        r = run_ours(engine, im, b, p, n)
        mean_ctx = p + n / 2
        step_bytes = weight_bytes(im.model, b) + b * mean_ctx * kv_tok
        roof = b / (step_bytes / bw)
        r.update(case=case, system="ours", roofline_tok_s=roof, pct_roofline=100 * r["tok_s"] / roof)
        rows.append(r)
        print(json.dumps(r), flush=True)
    hf_kinds = [k for k in a.hf.split(",") if k and k != "none"]
    for case in filter(None, a.hf_cases.split(",")) if hf_kinds else []:
        b, p, n = map(int, case.split("x"))
        for kind in hf_kinds:
            try:
                r = run_hf(kind, im.cfg, b, p, n, device)
            except Exception as e:  # report and go on: the other rows still count
                r = {"error": f"{type(e).__name__}: {e}"[:300]}
            r.update(case=case, system=f"hf-{kind}")
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.mixed:
        r = run_mixed(engine, im, a.mixed)
        r.update(case=f"mixed{a.mixed}", system="ours")
        rows.append(r)
        print(json.dumps(r), flush=True)
    if mix:
        r = run_prompt_mix(engine, im, a.mix_samples, *mix, a.mix_new)
        print(f"prompt mix {a.prompt_mix}:", json.dumps(r), flush=True)
        for mode in ("packed", "padded"):
            rows.append({**r[mode], "case": f"mix{a.prompt_mix}", "system": f"ours-{mode}"})
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; KV {kv_tok} B/token; slots {a.slots}; "
          f"small_prefill_tokens {engine.small_prefill_tokens}; graph captures {engine.stats['graph_captures']}")
    print(f"{'case':>14} {'system':>11} {'tok/s':>10} {'ms/step':>8} {'%roof':>6} {'busy':>5} {'prefill s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:>14} {r['system']:>11} {r['error']}")
            continue
        print(f"{r['case']:>14} {r['system']:>11} {r['tok_s']:>10.0f} {r.get('ms_per_step', float('nan')):>8.2f} "
              f"{r.get('pct_roofline', float('nan')):>6.1f} {r.get('busy', float('nan')):>5.2f} "
              f"{r.get('prefill_s', float('nan')):>9.3f}")
    if ab:
        for case, by in ab.items():
            med = {k: sorted(v)[len(v) // 2] for k, v in by.items()}
            print(f"split-K A/B {case}: median ms/step split {med['split']:.4f} vs plain {med['plain']:.4f} "
                  f"({med['plain'] / med['split']:.3f}x), rounds {json.dumps(by)}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"copy_bandwidth": bw, "rows": rows, "ab_split_k": ab}, f, indent=1)


if __name__ == "__main__":
    main()
