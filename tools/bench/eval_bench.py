"""Throughput of the evaluation harness (tools/evaluate.py's path) beside the bare engine, same run.

    python tools/bench/eval_bench.py                                  # bluelm-2.5-3b, one GPU
    python tools/bench/eval_bench.py --preset tiny --items 8 --budgets 0,4 --context 256   # CPU smoke run

The full decoder with random weights (bf16 on a GPU), the bundled tokenizer for prompts and grading
(logits restricted to its ids; the output layer keeps the preset's 100k rows, so the cost per token is
the real model's). A random model seldom closes its think block itself: most thinking samples run to
their budget, are force-closed and answer for ``--answer-tokens``. Per budget, after an untimed engine
pass over the same prompts (every shape seen once, its outputs recorded):

* harness: ``eval.harness.evaluate`` over ``--items`` items of ``--bench`` (rendering, generation
  through ``TextGenerator``, grading, the results file), items/s and generated tokens/s; grading and
  writing run on the harness's row thread while the engine generates (``plain``: ``overlap=False``,
  all of it between the generation calls);
* engine: ``generate_ids`` on the same prompt ids with the same request, tokens/s;
* ratio harness / engine tokens/s (1.0 = the harness adds nothing to the engine's time);
* host ms: the harness's whole host work per item, timed by replaying the recorded outputs through it
  at once (no GPU in the loop); exposed: (harness time - engine time) per item, the host work the
  overlap left on the critical path.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from megatron_bluelm.config.loader import load_config  # noqa: E402

MODEL_VOCAB = 100_000


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class ReplayEngine:
    """Stands in for the engine: returns the outputs of recorded ``generate_ids`` calls, in call order,
    at once (so the harness's own host work is all that is timed)."""

    def __init__(self, calls: list):
        self.calls, self.next = calls, 0

    def generate(self, prompts, samples_cfg, *, on_finish=None, **_) -> list:
        outs = self.calls[self.next % len(self.calls)]
        self.next += 1
        if len(outs) != len(prompts) or any(o.prompt != list(p) for o, p in zip(outs, prompts)):
            raise RuntimeError("replay: the harness asked for other prompts than the engine run recorded")
        results = []
        for i, o in enumerate(outs):
            r = {"tokens": o.tokens, "logprobs": o.logprobs, "forced": o.forced, "finish": o.finish_reason,
                 "thinking": o.thinking_tokens}
            results.append(r)
            if on_finish is not None:
                on_finish(i, r)
        return results


def _engine_pass(gen, prompts, settings, budget, max_new, batch_size, record=None) -> tuple[float, int]:
    """The bare engine over the prompt ids, batch by batch: (seconds, generated tokens)."""
    from megatron_bluelm.inference.generate import generate_ids
    from megatron_bluelm.inference.sampling import SamplingParams

    device, generated = gen.im.info.device, 0
    _sync(device)
    t = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        req = gen.request(bridge_text=settings.bridge(), max_new_tokens=max_new, thinking_budget=budget,
                          sampling=SamplingParams())
        outs = generate_ids(gen.engine, prompts[start:start + batch_size], req, ids=gen.ids,
                            vocab_size=gen.im.vocab_size, max_context=gen.im.max_context, tables=gen.tables)
        generated += sum(len(o.tokens) for o in outs)
        if record is not None:
            record.append(outs)
    _sync(device)
    return time.perf_counter() - t, generated


def _harness_pass(fn, bench, settings, device, overlap: bool) -> tuple[float, dict]:
    from megatron_bluelm.eval.harness import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        t = time.perf_counter()
        summary = evaluate(fn, [bench], settings, results_path=os.path.join(tmp, "r.jsonl"), progress=False,
                           overlap=overlap)
        _sync(device)
        return time.perf_counter() - t, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bluelm-2.5-3b")
    ap.add_argument("--bench", default="arithmetic")
    ap.add_argument("--items", type=int, default=512, help="items per budget (the set repeated as needed)")
    ap.add_argument("--budgets", default="0,64,256,1024")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256, help="items per generation call")
    ap.add_argument("--slots", type=int, default=256, help="engine slots (continuous batching)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()

    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.eval.benchmarks import Benchmark, load_benchmark
    from megatron_bluelm.eval.generation import EngineGenerate
    from megatron_bluelm.eval.harness import EvalSettings, _render_prompt, evaluate
    from megatron_bluelm.inference.engine import TextGenerator
    from megatron_bluelm.inference.model import build_inference_model

    cfg = load_config(None, ["--model.preset", a.preset, "--data.seq_length", str(a.context),
                             "--model.backend", "torch", "--training.precision",
                             "bf16" if torch.cuda.is_available() else "fp32"])
    tok = load_tokenizer(cfg.data.tokenizer_model)
    im = build_inference_model(cfg, MODEL_VOCAB)
    im.vocab_size = tok.vocab_size  # sample only ids the tokenizer has
    device = im.info.device
    gen = TextGenerator(im, tok, max_slots=a.slots)
    src = load_benchmark(a.bench)
    items = [src.items[i % len(src.items)] for i in range(a.items)]
    items = [type(it)(**{**it.__dict__, "id": f"{it.id}#{i}"}) for i, it in enumerate(items)]
    bench = Benchmark(src.name, src.path, items)
    budgets = [int(b) for b in a.budgets.split(",")]
    rows = []
    for budget in budgets:
        settings = EvalSettings(budgets=[budget], answer_tokens=a.answer_tokens, batch_size=a.batch_size)
        fn = EngineGenerate(gen, settings)
        evaluate(fn, [Benchmark(bench.name, bench.path, items[:min(8, len(items))])], settings, progress=False)
        prompts = [tok.encode(_render_prompt(it, budget)) for it in items]
        max_new = settings.max_tokens(budget, fn.forced_length)
        # the cache and graphs for a full batch before any clock starts (else the first timed run
        # pays the allocation and the graph captures, the second reuses them)
        gen.engine.reserve(min(a.batch_size, len(items)), max(map(len, prompts)) + max_new, max_new, im.vocab_size)

        run = dict(gen=gen, prompts=prompts, settings=settings, budget=budget, max_new=max_new,
                   batch_size=a.batch_size)
        recorded: list = []
        _engine_pass(**run, record=recorded)  # untimed: every prefill / decode shape of the timed runs seen once
        dt_h, summary = _harness_pass(fn, bench, settings, device, overlap=True)
        dt_p, _ = _harness_pass(fn, bench, settings, device, overlap=False)
        dt_e, generated = _engine_pass(**run)
        # the host's share alone: the same sweep over the engine's recorded outputs, returned at once
        real_engine, gen.engine = gen.engine, ReplayEngine(recorded)
        try:
            dt_r, _ = _harness_pass(fn, bench, settings, device, overlap=False)
        finally:
            gen.engine = real_engine
        tp = summary["throughput"]
        n = len(items)
        row = {"budget": budget, "items": n, "harness_items_s": n / dt_h,
               "harness_tok_s": tp["generated_tokens"] / dt_h, "engine_tok_s": generated / dt_e,
               "ratio": (tp["generated_tokens"] / dt_h) / (generated / dt_e),
               "plain_items_s": n / dt_p,  # the same harness, grading and writing between the calls
               "host_ms_per_item": 1e3 * dt_r / n,  # all host work of the harness (replayed outputs)
               "exposed_ms_per_item": 1e3 * (dt_h - dt_e) / n,  # harness time over the bare engine's
               "harness_host_ms_per_item": 1e3 * tp["host_seconds"] / n,  # its own count: not in generate
               "mean_thinking": summary["benchmarks"][bench.name]["budgets"][
                   "nothink" if budget == 0 else str(budget)]["mean_thinking_tokens"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{a.preset} on {name}, {a.items} items of {a.bench} per budget, batch {a.batch_size}, slots {a.slots}")
    print(f"{'budget':>7} {'think':>6} {'items/s':>9} {'plain':>8} {'harness tok/s':>14} {'engine tok/s':>13} "
          f"{'ratio':>6} {'host ms':>8} {'exposed':>8}")
    for r in rows:
        print(f"{r['budget']:>7} {r['mean_thinking']:>6.0f} {r['harness_items_s']:>9.2f} {r['plain_items_s']:>8.2f} "
              f"{r['harness_tok_s']:>14.0f} {r['engine_tok_s']:>13.0f} {r['ratio']:>6.2f} "
              f"{r['host_ms_per_item']:>8.3f} {r['exposed_ms_per_item']:>8.3f}")
    print("items/s: harness (grading + writing on the row thread); plain: overlap=False; host ms: per item, all "
          "host work of the harness (the sweep replayed over recorded outputs); exposed: per item, harness time "
          "minus the bare engine's")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
