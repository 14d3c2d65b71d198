#!/usr/bin/env python
"""Generate from a checkpoint: plain text or chat prompts, images, thinking budget, TP / PP via torchrun.

  python tools/generate.py --checkpoint outputs/sft_toy/ckpt --chat --prompt "reverse: cat sun tree" \\
      --thinking-budget 16 --max-new-tokens 48
  torchrun --nproc-per-node 2 tools/generate.py --checkpoint CKPT --tp 2 --prompt "def main(" --temperature 0.7
  python tools/generate.py --checkpoint outputs/mm_stage2/ckpt --chat --prompt "<image> What is this?" \\
      --image megatron_bluelm/assets/images/chelsea.jpg

The model shape, context and tokenizer come from the checkpoint's meta.json (--tokenizer-model
overrides the tokenizer and is checked against the checkpoint); a checkpoint of the multimodal stage
(vision.preset set) loads the ViT + adapter + decoder. --thinking-budget 0 renders the non-thinking
prompt (empty think block); N forces </think> after N thinking tokens.

Images (multimodal checkpoints): --image files are matched in order to the <image> placeholders of
the prompts (the k-th placeholder, counting through the prompts, takes the k-th --image); a single
prompt without a placeholder gets all images in front of its text (of its user turn with --chat).
Tiling and image tokens are the multimodal stage's (docs/MULTIMODAL.md).
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
    p.add_argument("--image", action="append", default=[],
                   help="image file (repeatable), for the <image> placeholders of the prompts in order")
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


def _messages(args, text: str) -> list:
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": text}]


def _check_images(args, cfg) -> tuple[list, list]:
    """Fail before the model is built: unreadable files, placeholder counts, a text-only checkpoint.
    Returns the image paths and the decoded images per prompt (each file is decoded once, here)."""
    from megatron_bluelm.inference import GenerationError
    from megatron_bluelm.inference.images import assign_images, load_image

    if args.image and not cfg.vision.enabled:
        raise GenerationError(f"--image {' '.join(args.image)}: checkpoint '{args.checkpoint}' is a text decoder "
                              "(vision.preset: none) and cannot take images; use a checkpoint of the multimodal "
                              "stage (docs/MULTIMODAL.md)")
    decoded = [load_image(path, "--image") for path in args.image]
    return assign_images(args.prompt, args.image), assign_images(args.prompt, decoded)


def run(args) -> list:
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.inference import SamplingParams
    from megatron_bluelm.inference.engine import TextGenerator
    from megatron_bluelm.inference.loading import check_tokenizer, checkpoint_run_config, load_weights
    from megatron_bluelm.inference.model import build_inference_model, set_layout

    cfg = set_layout(checkpoint_run_config(args.checkpoint), args.tp, args.pp)
    paths, images = _check_images(args, cfg)
    tok = load_tokenizer(args.tokenizer_model or cfg.data.tokenizer_model)
    check_tokenizer(cfg, tok, args.checkpoint)
    im = build_inference_model(cfg, tok.vocab_size, image_token_id=tok.special_ids["<image>"])
    load_weights([im.model], args.checkpoint)
    gen = TextGenerator(im, tok)
    req = gen.request(bridge_text=args.bridge_text, max_new_tokens=args.max_new_tokens,
                      thinking_budget=args.thinking_budget,
                      sampling=SamplingParams(args.temperature, args.top_k, args.top_p, args.seed))
    if args.chat:
        outs = gen.chat([_messages(args, p) for p in args.prompt], req, images)
    else:
        outs = gen.generate(args.prompt, req, images)
    return [{"prompt": p, "images": imgs, "text": gen.decode(o), "finish_reason": o.finish_reason,
             "thinking_tokens": o.thinking_tokens, "forced_close": o.forced_close}
            for p, imgs, o in zip(args.prompt, paths, outs)]


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
