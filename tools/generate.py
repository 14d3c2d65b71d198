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

The thinking budget's forced close is SFT's ("\n</think>\n" + SFT's bridge text, see
data/chat_template.py); --bridge-text replaces the bridge, --budget-message goes before the close,
--budget-grace lets up to N more thinking tokens run until a sentence ends.

Batch mode, for large prompt sets (docs/SFT_AND_GENERATION.md, "Batch generation"):

  python tools/generate.py --checkpoint CKPT --chat --input prompts.jsonl --output out.jsonl \
      --thinking-budget 256 --max-new-tokens 512

Each input line is a JSON object: "prompt" (text) or "messages" (a conversation), and optionally
"id" (default: the line number), "images" (paths, relative to the input file), "thinking_budget",
"max_new_tokens", "n" (samples). Each finished sample is appended to --output as one JSON line; a
re-run skips the samples already there (a torn last line of a killed run is dropped). Bad input
lines are named by file:line before the model is built (exit code 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bluelm.config.errors import ConfigError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (save dir or iter_*)")
    p.add_argument("--tokenizer-model", default=None, help="default: the one the checkpoint was trained with")
    p.add_argument("--prompt", action="append", default=None, help="repeat for a batch")
    p.add_argument("--input", default=None, help="batch mode: JSONL of prompts (one JSON object a line)")
    p.add_argument("--output", default=None, help="batch mode: JSONL the samples are appended to (resumable)")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="batch mode: samples per engine call (memory bound; keep it when resuming a sampled run)")
    p.add_argument("--logprobs", action="store_true",
                   help="batch mode: also write token_ids, logprobs and the forced-token mask per sample")
    p.add_argument("--no-progress", action="store_true", help="batch mode: no progress bar")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn (chat template)")
    p.add_argument("--system", default=None, help="system turn (with --chat)")
    p.add_argument("--image", action="append", default=[],
                   help="image file (repeatable), for the <image> placeholders of the prompts in order")
    p.add_argument("--thinking-budget", type=int, default=None, help="None: unlimited; 0: non-thinking")
    p.add_argument("--bridge-text", default=None,
                   help="forced after a budget-forced </think> (default: the bridge SFT trains with)")
    p.add_argument("--budget-message", default="", help="forced before the budget's </think>")
    p.add_argument("--budget-grace", type=int, default=0,
                   help="thinking tokens allowed past the budget while waiting for a sentence end")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    args = p.parse_args(argv)
    if args.input is None and not args.prompt:
        p.error("give --prompt (repeatable) or --input prompts.jsonl")
    if args.input is not None:
        if args.prompt:
            p.error("--prompt and --input exclude each other (put the prompts in the --input file)")
        if args.output is None:
            p.error("--input needs --output (the JSONL the samples are written to)")
        if args.image:
            p.error("--image is for --prompt; in batch mode each input line names its own \"images\"")
        if args.chunk_size <= 0:
            p.error(f"--chunk-size: must be > 0, got {args.chunk_size}")
    elif args.output is not None:
        p.error("--output is for batch mode (--input); --prompt prints to stdout")
    return args


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


def _load_config_and_tokenizer(args):
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.inference.loading import check_tokenizer, checkpoint_run_config
    from megatron_bluelm.inference.model import set_layout

    cfg = set_layout(checkpoint_run_config(args.checkpoint), args.tp, args.pp)
    tok = load_tokenizer(args.tokenizer_model or cfg.data.tokenizer_model)
    check_tokenizer(cfg, tok, args.checkpoint)
    return cfg, tok


def _generator(args, cfg, tok):
    from megatron_bluelm.inference.engine import TextGenerator
    from megatron_bluelm.inference.loading import load_weights
    from megatron_bluelm.inference.model import build_inference_model

    im = build_inference_model(cfg, tok.vocab_size, image_token_id=tok.special_ids["<image>"])
    load_weights([im.model], args.checkpoint)
    return TextGenerator(im, tok)


def _request(args, gen, seed: int, **kwargs):
    from megatron_bluelm.inference import SamplingParams

    # bridge_text None: the request takes SFT's bridge, so the forced close is what SFT taught
    return gen.request(bridge_text=args.bridge_text, budget_message=args.budget_message,
                       budget_grace=args.budget_grace,
                       sampling=SamplingParams(args.temperature, args.top_k, args.top_p, seed), **kwargs)


def run(args) -> list:
    cfg, tok = _load_config_and_tokenizer(args)
    paths, images = _check_images(args, cfg)
    gen = _generator(args, cfg, tok)
    req = _request(args, gen, args.seed, max_new_tokens=args.max_new_tokens, thinking_budget=args.thinking_budget)
    if args.chat:
        outs = gen.chat([_messages(args, p) for p in args.prompt], req, images)
    else:
        outs = gen.generate(args.prompt, req, images)
    return [{"prompt": p, "images": imgs, "text": gen.decode(o), "finish_reason": o.finish_reason,
             "thinking_tokens": o.thinking_tokens, "forced_close": o.forced_close}
            for p, imgs, o in zip(args.prompt, paths, outs)]


# -- batch mode -------------------------------------------------------------------------------------
_FIELDS = {"id", "prompt", "messages", "images", "thinking_budget", "max_new_tokens", "n"}
_ROLES = {"system", "user", "assistant", "tool"}
_MAX_NAMED = 20  # bad lines listed in one error


class BatchInputError(ConfigError):
    """Bad lines of a batch input (or a damaged output file); the message names each file:line."""


class BatchLine:
    """One input line, checked. (A plain class: tests load this file as a module without
    registering it, which dataclasses cannot handle.)"""

    def __init__(self, where: str, id, prompt, messages, images, thinking_budget, max_new_tokens: int, n: int):
        self.where = where  # file:line
        self.id, self.prompt, self.messages, self.images = id, prompt, messages, images
        self.thinking_budget, self.max_new_tokens, self.n = thinking_budget, max_new_tokens, n
        self.ids: list[int] = []  # the prompt's tokens (rendered for chat)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _line_problem(rec, args) -> str | None:
    """What is wrong with one parsed input line (None: nothing)."""
    if not isinstance(rec, dict):
        return f"a JSON object is needed, got {type(rec).__name__}"
    unknown = sorted(set(rec) - _FIELDS)
    if unknown:
        return f"unknown field(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(_FIELDS))})"
    if ("prompt" in rec) == ("messages" in rec):
        return 'needs exactly one of "prompt" (text) and "messages" (a conversation)'
    if "id" in rec and not (isinstance(rec["id"], str) or _is_int(rec["id"])):
        return f'"id" must be a string or an integer, got {json.dumps(rec["id"])}'
    if "prompt" in rec and (not isinstance(rec["prompt"], str) or not rec["prompt"]):
        return f'"prompt" must be a non-empty string, got {json.dumps(rec["prompt"])[:80]}'
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return '"messages" must be a non-empty list of {"role": ..., "content": ...}'
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
                return (f'"messages"[{k}] must be {{"role": one of {", ".join(sorted(_ROLES))}, "content": a '
                        f"string}}, got {json.dumps(m)[:80]}")
    if "images" in rec and (not isinstance(rec["images"], list)
                            or not all(isinstance(x, str) and x for x in rec["images"])):
        return '"images" must be a list of image file paths'
    b = rec.get("thinking_budget")
    if b is not None and (not _is_int(b) or b < 0):
        return f'"thinking_budget" must be an integer >= 0 (0 = non-thinking) or null (unlimited), got {json.dumps(b)}'
    if "max_new_tokens" in rec and (not _is_int(rec["max_new_tokens"]) or rec["max_new_tokens"] <= 0):
        return f'"max_new_tokens" must be an integer > 0, got {json.dumps(rec["max_new_tokens"])}'
    if "n" in rec and (not _is_int(rec["n"]) or rec["n"] <= 0):
        return f'"n" must be an integer > 0, got {json.dumps(rec["n"])}'
    return None


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_NAMED} more" if len(problems) > _MAX_NAMED else ""
        raise BatchInputError(f"{len(problems)} bad line(s) in {what}:\n  " + "\n  ".join(problems[:_MAX_NAMED]) + more)


def read_batch_input(path: str, args) -> list[BatchLine]:
    """Parse and check every line (blank lines skipped); all bad lines are named at once."""
    try:
        with open(path, "rb") as f:
            raw = f.read().split(b"\n")
    except OSError as e:
        raise BatchInputError(f"--input '{path}': cannot read it: {e.strerror}") from None
    base = os.path.dirname(os.path.abspath(path))
    lines, problems, seen = [], [], {}
    for no, data in enumerate(raw, start=1):
        where = f"{path}:{no}"
        if not data.strip():
            continue
        try:
            rec = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"{where}: not JSON ({e})")
            continue
        problem = _line_problem(rec, args)
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        rid = rec.get("id", no)
        key = json.dumps(rid)
        if key in seen:
            problems.append(f"{where}: id {key} already used at {seen[key]} (resuming matches samples by id)")
            continue
        seen[key] = where
        images = [x if os.path.isabs(x) else os.path.join(base, x) for x in rec.get("images", [])]
        lines.append(BatchLine(where, rid, rec.get("prompt"), rec.get("messages"), images,
                               rec.get("thinking_budget", args.thinking_budget),
                               rec.get("max_new_tokens", args.max_new_tokens), rec.get("n", 1)))
    _raise_if(problems, f"--input '{path}'")
    if not lines:
        raise BatchInputError(f"--input '{path}': no prompts in it")
    return lines


def prepare_prompts(lines: list[BatchLine], args, cfg, tok) -> None:
    """Render (chat) and tokenize every line; lines that cannot run on this checkpoint are named."""
    from megatron_bluelm.inference import GenerationError
    from megatron_bluelm.inference.engine import place_images, render_prompt
    from megatron_bluelm.inference.images import PromptImages

    context = cfg.data.seq_length
    sizer = PromptImages.for_model(cfg.vision, tok, with_pixels=False) if cfg.vision.enabled else None
    problems = []
    for ln in lines:
        if ln.images and sizer is None:
            problems.append(f"{ln.where}: {len(ln.images)} image(s), but checkpoint '{args.checkpoint}' is a text "
                            "decoder (vision.preset: none); image prompts need a checkpoint of the multimodal stage")
            continue
        if ln.messages is not None or args.chat:
            msgs = ln.messages if ln.messages is not None else _messages(args, ln.prompt)
            text = render_prompt(place_images(msgs, len(ln.images)), thinking=ln.thinking_budget != 0)
        else:
            text = ln.prompt
        ln.ids = tok.encode(text)
        try:
            if sizer is not None:  # image blocks counted as generation will expand them
                sizer.expand([ln.ids], [ln.images], context)
            elif len(ln.ids) >= context:
                problems.append(f"{ln.where}: the prompt has {len(ln.ids)} tokens; the model's context is {context} "
                                "(data.seq_length), which leaves no room to generate")
        except GenerationError as e:
            problems.append(f"{ln.where}: {str(e).removeprefix('prompt 0: ')}")
    _raise_if(problems, f"--input '{args.input}'")


def read_done(path: str) -> tuple[set, int | None]:
    """The (id, sample) pairs already in the output, and the byte length to cut a torn last line at
    (None: nothing to cut). A damaged complete line is named, not dropped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return set(), None
    except OSError as e:
        raise BatchInputError(f"--output '{path}': cannot read it: {e.strerror}") from None
    cut = None
    if data and not data.endswith(b"\n"):  # a write cut off by a kill: that sample runs again
        cut = data.rfind(b"\n") + 1
        data = data[:cut]
    done, problems = set(), []
    for no, line in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            rec = json.loads(line)
            done.add((json.dumps(rec["id"]), rec["sample"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            problems.append(f"{path}:{no}: not a sample record of this tool (a JSON object with \"id\" and "
                            "\"sample\"); move the file away or fix that line")
    _raise_if(problems, f"--output '{path}'")
    return done, cut


class _Writer:
    """Appends one complete JSON line per sample with a single write on an O_APPEND descriptor, so
    a killed run leaves at most a torn last line (which the next run drops)."""

    def __init__(self, path: str, cut: int | None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if cut is not None:
            os.ftruncate(self.fd, cut)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        os.close(self.fd)


def _record(args, gen, ln: BatchLine, sample: int, out) -> dict:
    rec = {"id": ln.id, "sample": sample, "text": gen.decode(out), "tokens": len(out.tokens),
           "prompt_tokens": len(ln.ids), "finish_reason": out.finish_reason,
           "thinking_tokens": out.thinking_tokens, "forced_close": out.forced_close, "warnings": out.warnings}
    if args.logprobs:
        rec.update(token_ids=out.tokens, logprobs=out.logprobs, forced=out.forced)
    return rec


def _progress(args, total: int, rank: int):
    if args.no_progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="generate", file=sys.stderr, dynamic_ncols=True)


def run_batch(args) -> dict:
    """Batch mode: generate every (line, sample) not yet in --output; returns counts for the summary."""
    import torch.distributed as dist

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world != args.tp * args.pp:
        raise BatchInputError(f"batch mode runs one model replica: launch --tp x --pp = {args.tp * args.pp} "
                              f"process(es), not {world} (split the input file to run more replicas)")
    lines = read_batch_input(args.input, args)
    cfg, tok = _load_config_and_tokenizer(args)
    prepare_prompts(lines, args, cfg, tok)
    done, cut = read_done(args.output) if rank == 0 else (None, None)
    samples = [(ln, k) for ln in lines for k in range(ln.n)]
    if world == 1 and all((json.dumps(ln.id), k) in done for ln, k in samples):
        return {"samples": len(samples), "skipped": len(samples), "generated": 0, "tokens": 0}
    gen = _generator(args, cfg, tok)
    if world > 1:  # every rank must make the same calls: all take rank 0's view of the output
        box = [done]  # (other nodes may not see the file at all)
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    todo = [(json.dumps(ln.id), k) not in done for ln, k in samples]
    stats = {"samples": len(samples), "skipped": len(samples) - sum(todo), "generated": 0, "tokens": 0}
    if not any(todo):
        return stats
    writer = _Writer(args.output, cut) if rank == 0 else None
    bar, start = _progress(args, sum(todo), rank), time.perf_counter()
    try:
        for c, first in enumerate(range(0, len(samples), args.chunk_size)):
            chunk = samples[first:first + args.chunk_size]
            wanted = todo[first:first + args.chunk_size]
            if not any(wanted):
                continue
            # Sampling draws sample i of a call from the stream (seed, i): a resumed sampled run
            # re-runs a partly written chunk whole (writing only the missing samples), so every
            # sample gets the stream an uninterrupted run gives it. Greedy needs only the missing ones.
            if args.temperature == 0.0:
                chunk = [s for s, w in zip(chunk, wanted) if w]
                wanted = [True] * len(chunk)

            def finished(i, out, chunk=chunk, wanted=wanted):
                if not wanted[i]:
                    return
                ln, k = chunk[i]
                stats["generated"] += 1
                stats["tokens"] += len(out.tokens)
                if writer is not None:
                    writer.write(_record(args, gen, ln, k, out))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{stats['tokens'] / max(time.perf_counter() - start, 1e-9):,.0f} tok/s")

            req = _request(args, gen, args.seed + c, max_new_tokens=[ln.max_new_tokens for ln, _ in chunk],
                           thinking_budget=[ln.thinking_budget for ln, _ in chunk])
            images = [ln.images for ln, _ in chunk] if any(ln.images for ln, _ in chunk) else None
            gen.generate_ids([ln.ids for ln, _ in chunk], req, images, on_finish=finished)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    stats["seconds"] = time.perf_counter() - start
    return stats


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if args.input is not None:
            stats = run_batch(args)
        else:
            results = run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.input is not None:
        if rank == 0:
            rate = stats["tokens"] / stats["seconds"] if stats.get("seconds") else 0.0
            print(f"{args.output}: {stats['generated']} sample(s) written ({stats['tokens']} tokens, {rate:,.0f} "
                  f"tok/s), {stats['skipped']} of {stats['samples']} already there", file=sys.stderr)
    elif rank == 0:
        for r in results:
            print(json.dumps(r) if args.json else f"### {r['prompt']}\n{r['text']}\n[{r['finish_reason']}]")
    from megatron_bluelm.parallel.setup import teardown

    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
