#!/usr/bin/env python
"""Evaluate a checkpoint on JSONL benchmarks over a list of thinking budgets (docs/EVALUATION.md).

  python tools/evaluate.py --checkpoint outputs/eval_toy/ckpt --bench arithmetic --bench word_problems \\
      --budgets 0,4,8,16,32,none --output outputs/eval_toy/eval
  torchrun --nproc-per-node 4 tools/evaluate.py --checkpoint CKPT --tp 2 --pp 2 --bench gsm8k=gsm8k_test.jsonl \\
      --budgets 0,64,256,1024,none --samples 4 --pass-k 1,4 --temperature 0.6 --output out/gsm8k
  python tools/evaluate.py --hf outputs/hf_export --bench arithmetic --budgets 0,16,none --output out/hf
  python tools/evaluate.py --compare out/a out/b --labels base,sft --plot out/compare.png

Budgets: 0 = non-thinking (empty think block), N = thinking closed after N tokens, none = unlimited.
Bundled sets: arithmetic, word_problems, choice, images (megatron_bluelm/assets/eval/); any other
--bench is a JSONL path (name=path names it). Writes OUTPUT/results.jsonl (per item, resumable: run
the same command again after an interruption), summary.json, table.md and budget.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bluelm.config.errors import ConfigError  # noqa: E402


def parse_budgets(text: str) -> list:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("none", "inf", "unlimited"):
            out.append(None)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ConfigError(f"--budgets: {part!r} is not a token count or 'none' (e.g. 0,64,256,none)")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory of our training (save dir or iter_*)")
    src.add_argument("--hf", help="HF export directory (tools/convert_checkpoint.py mcore-to-hf); text only")
    src.add_argument("--compare", nargs="+", help="summary.json files or output directories: overlay plot only")
    p.add_argument("--labels", default=None, help="--compare: comma-separated names of the runs")
    p.add_argument("--bench", action="append", default=None,
                   help="bundled name (arithmetic, word_problems, choice, images), PATH.jsonl or NAME=PATH")
    p.add_argument("--budgets", default="0,64,256,1024,none", help="0 = non-thinking, none = unlimited")
    p.add_argument("--samples", type=int, default=1, help="responses per item and budget (n for pass@k)")
    p.add_argument("--pass-k", default="1", help="comma-separated k values, each <= --samples")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=1024, help="response length with an unlimited budget")
    p.add_argument("--answer-tokens", type=int, default=64, help="budget N: tokens allowed after the think block")
    p.add_argument("--batch-size", type=int, default=32, help="items per generation call")
    p.add_argument("--limit", type=int, default=None, help="first N items of each benchmark")
    p.add_argument("--grader", default="math", help="default grader of items that name none")
    p.add_argument("--bridge-text", default=None, help="forced after a budget-closed think block "
                   "(default: the SFT bridge, data/sft.DEFAULT_BRIDGE)")
    p.add_argument("--tokenizer-model", default=None, help="default: the one the checkpoint was trained with")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--output", default=None, help="directory for results.jsonl, summary.json, table.md, budget.png")
    p.add_argument("--plot", default=None, help="PNG path (default OUTPUT/budget.png)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _settings(args):
    from megatron_bluelm.eval.harness import EvalSettings

    try:
        pass_k = [int(k) for k in args.pass_k.split(",")]
    except ValueError:
        raise ConfigError(f"--pass-k: expected comma-separated integers, got {args.pass_k!r}") from None
    s = EvalSettings(budgets=parse_budgets(args.budgets), samples=args.samples, pass_k=pass_k,
                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                     max_new_tokens=args.max_new_tokens, answer_tokens=args.answer_tokens,
                     batch_size=args.batch_size, bridge_text=args.bridge_text)
    s.check()
    return s


def _engine(args, settings, benchmarks):
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.eval.generation import EngineGenerate
    from megatron_bluelm.inference.engine import TextGenerator
    from megatron_bluelm.inference.loading import check_tokenizer, checkpoint_run_config, load_weights
    from megatron_bluelm.inference.model import build_inference_model, set_layout

    cfg = set_layout(checkpoint_run_config(args.checkpoint), args.tp, args.pp)
    with_images = [it.where for b in benchmarks for it in b.items if it.images]
    if with_images and not cfg.vision.enabled:
        raise ConfigError(f"{with_images[0]}: an image question, but checkpoint '{args.checkpoint}' is a text decoder "
                          "(vision.preset: none); evaluate image sets with a checkpoint of the multimodal stage")
    tok = load_tokenizer(args.tokenizer_model or cfg.data.tokenizer_model)
    check_tokenizer(cfg, tok, args.checkpoint)
    im = build_inference_model(cfg, tok.vocab_size, image_token_id=tok.special_ids["<image>"])
    if im.info.dp > 1:
        raise ConfigError(f"{im.info.world_size} processes for --tp {args.tp} x --pp {args.pp}: evaluation runs one "
                          f"model replica; launch tp x pp = {args.tp * args.pp} processes")
    loaded = load_weights([im.model], args.checkpoint)
    return EngineGenerate(TextGenerator(im, tok), settings), {"checkpoint": os.path.abspath(loaded)}


def _is_writer() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _compare(args) -> int:
    from megatron_bluelm.eval.plots import budget_plot

    runs = []
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.compare):
        raise ConfigError(f"--labels: {len(labels)} names for {len(args.compare)} runs")
    for i, path in enumerate(args.compare):
        file = os.path.join(path, "summary.json") if os.path.isdir(path) else path
        try:
            with open(file, encoding="utf-8") as f:
                summary = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--compare: cannot read summary '{file}': {e}") from None
        if "benchmarks" not in summary:
            raise ConfigError(f"--compare: '{file}' is not a summary.json of tools/evaluate.py")
        runs.append((labels[i] if labels else os.path.basename(os.path.dirname(os.path.abspath(file))), summary))
    out = args.plot or (os.path.join(args.output, "compare.png") if args.output else "compare.png")
    print(f"wrote {budget_plot(runs, out)}")
    return 0


def run(args) -> dict:
    from megatron_bluelm.eval.benchmarks import load_benchmark
    from megatron_bluelm.eval.harness import evaluate, format_table
    from megatron_bluelm.eval.plots import budget_plot

    settings = _settings(args)
    benchmarks = [load_benchmark(b, args.grader, args.limit) for b in (args.bench or ["arithmetic"])]
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ConfigError(f"--bench: two benchmarks named {names}; name them with NAME=PATH")
    if args.hf:
        from megatron_bluelm.eval.generation import HFGenerate

        if any(it.images for b in benchmarks for it in b.items):
            raise ConfigError("--hf: image benchmarks need --checkpoint (the HF path is text only)")
        generate, meta = HFGenerate(args.hf, settings), {"checkpoint": os.path.abspath(args.hf), "format": "hf"}
    else:
        generate, meta = _engine(args, settings, benchmarks)
    writer = _is_writer()
    results = os.path.join(args.output, "results.jsonl") if args.output else None
    summary = evaluate(generate, benchmarks, settings, results_path=results, meta=meta,
                       progress=not args.no_progress, writer=writer)
    if writer:
        table = format_table(summary)
        print(table)
        t = summary["throughput"]
        print(f"generated {t['items']} item-budget pairs in {t['seconds']:.1f} s: {t['items_per_s']:.2f} items/s, "
              f"{t['tokens_per_s']:,.0f} tokens/s")
        if args.output:
            with open(os.path.join(args.output, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
            with open(os.path.join(args.output, "table.md"), "w", encoding="utf-8") as f:
                f.write(table + "\n")
        plot = args.plot or (os.path.join(args.output, "budget.png") if args.output else None)
        if plot:
            print(f"wrote {budget_plot([(os.path.basename(meta['checkpoint']), summary)], plot)}")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.compare:
            return _compare(args)
        run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.compare and not args.hf:
            from megatron_bluelm.parallel.setup import teardown

            teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
