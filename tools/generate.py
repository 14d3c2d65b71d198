#!/usr/bin/env python
"""Generate from a checkpoint: plain text or chat prompts, thinking budget, TP / PP via torchrun.

  python tools/generate.py --checkpoint outputs/sft_toy/ckpt --chat --prompt "reverse: cat sun tree" \\
      --thinking-budget 16 --max-new-tokens 48
  torchrun --nproc-per-node 2 tools/generate.py --checkpoint CKPT --tp 2 --prompt "def main(" --temperature 0.7

The model shape, context and tokenizer come from the checkpoint's meta.json (--tokenizer-model
overrides the tokenizer and is checked against the checkpoint). --thinking-budget 0 renders the
non-thinking prompt (empty think block); N forces </think> after N thinking tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bluelm.config.errors import ConfigError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (save dir or iter_*)")
    p.add_argument("--tokenizer-model", default=None, help="default: the one the checkpoint was trained with")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn (chat template)")
    p.add_argument("--system", default=None, help="system turn (with --chat)")
    p.add_argument("--image", action="append", default=[], help="image file for the first prompt (<image>)")
    p.add_argument("--thinking-budget", type=int, default=None, help="None: unlimited; 0: non-thinking")
    p.add_argument("--bridge-text", default="", help="forced after a budget-forced </think>")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p.parse_args(argv)


def _messages(args, text: str, first: bool) -> list:
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    if first and args.image:
        text = "<image>" * len(args.image) + text
    return msgs + [{"role": "user", "content": text}]


def run(args) -> list:
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.inference import GenerationError, SamplingParams
    from megatron_bluelm.inference.engine import TextGenerator
    from megatron_bluelm.inference.loading import check_tokenizer, checkpoint_run_config, load_weights
    from megatron_bluelm.inference.model import build_inference_model

    if args.image:  # the decoder-only checkpoints of this repository have no vision tower yet
        raise GenerationError("--image: this checkpoint is a text decoder (no vision encoder / adapter in "
                              "megatron_bluelm/models yet); image prompts need the multimodal model")
    cfg = checkpoint_run_config(args.checkpoint)
    cfg.parallel.tp, cfg.parallel.pp = args.tp, args.pp
    tok = load_tokenizer(args.tokenizer_model or cfg.data.tokenizer_model)
    check_tokenizer(cfg, tok, args.checkpoint)
    im = build_inference_model(cfg, tok.vocab_size)
    load_weights([im.model], args.checkpoint)
    gen = TextGenerator(im, tok)
    req = gen.request(bridge_text=args.bridge_text, max_new_tokens=args.max_new_tokens,
                      thinking_budget=args.thinking_budget,
                      sampling=SamplingParams(args.temperature, args.top_k, args.top_p, args.seed))
    if args.chat:
        outs = gen.chat([_messages(args, p, i == 0) for i, p in enumerate(args.prompt)], req)
    else:
        outs = gen.generate(args.prompt, req)
    return [{"prompt": p, "text": gen.decode(o), "finish_reason": o.finish_reason,
             "thinking_tokens": o.thinking_tokens, "forced_close": o.forced_close}
            for p, o in zip(args.prompt, outs)]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        for r in results:
            print(json.dumps(r) if args.json else f"### {r['prompt']}\n{r['text']}\n[{r['finish_reason']}]")
    from megatron_bluelm.parallel.setup import teardown

    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
