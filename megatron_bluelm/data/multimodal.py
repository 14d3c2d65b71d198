"""Image-text JSONL -> indexed datasets of tokens, loss mask and encoded image bytes.

Input, one record per line (image paths relative to the JSONL file's folder, or absolute)::

    {"images": ["cat.jpg"], "text": "<image>\\nA cat on a mat."}
    {"images": ["a.jpg", "b.jpg"], "messages": [{"role": "user", "content": "<image><image> Compare."},
                                                {"role": "assistant", "content": "The first ..."}]}

``text`` is learned everywhere; ``messages`` only on the assistant turns (rendered with the project
chat template, data/chat_template.py, as in SFT and generation: an assistant turn with a
``thinking`` field gets it in its think block, others an empty one). Each image needs one
``<image>`` placeholder, or the text has none and the images go first. Output (all megatron-core
IndexedDatasets, one sequence per record or image, one document per record)::

    PREFIX_text_document        tokens, each <image> still ONE token (expanded when loading)
    PREFIX_loss_mask_document   uint8, 1 = learn to predict this token
    PREFIX_images               uint8, the image file's bytes as stored (JPEG / PNG / ...), a record's
                                images are one document (so per-record image counts are in the index)

Why this format and not webdataset / energon shards: the sample index stays random-access, so the
loader keeps Megatron's exact-resume sampler (consumed samples -> position) and the seeded shuffle of
the text data; image bytes are read through the page cache by memory map like the tokens, no extra
dependency. Tiling happens at load time, so one preprocessed set serves any ``vision.max_tiles``.

Every image is decoded once here: a missing, unreadable or corrupt image stops with
``file:line: image 'path': reason`` (``--on-error skip`` skips such records and counts them).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.images import IMAGE, ImageError, open_image
from megatron_bluelm.data.indexed_writer import IndexedWriter, committed, token_dtype
from megatron_bluelm.data.jsonl import BadLine, iter_lines, open_input

TEXT_SUFFIX, MASK_SUFFIX, IMAGES_SUFFIX = "_text_document", "_loss_mask_document", "_images"


@dataclass
class MultimodalOptions:
    inputs: list[str]
    output_prefix: str
    tokenizer_model: str
    on_error: str = "fail"  # or "skip"


@dataclass
class MultimodalSummary:
    records: int = 0
    images: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"records: {self.records:,}   images: {self.images:,}   tokens: {self.tokens:,} "
                 "(before image expansion)", f"skipped records: {sum(self.skipped.values()):,}"]
        return "\n".join(lines + [f"  e.g. {e}" for e in self.examples])


def render_messages(messages, where: str) -> str:
    """A ``messages`` record in the project chat template (data/chat_template.py), as SFT and
    generation render it: an assistant turn opens with its ``thinking`` text in a think block, or
    an empty one."""
    from megatron_bluelm.data.chat_template import render_chat

    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ImageError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects")
    try:
        return render_chat(messages, thinking=True)
    except ValueError as e:
        raise ImageError(f"{where}: {e}") from None


def encode_record(rec: dict, tok, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens ending with EOD, per-token loss mask)."""
    from megatron_bluelm.data.sft import assistant_loss_mask

    if "messages" in rec:
        tokens = np.asarray(tok.encode(render_messages(rec["messages"], where)) + [tok.eod], np.int64)
        mask = assistant_loss_mask(tokens, tok.special_ids["<|assistant|>"], tok.special_ids["<|end|>"])
    elif isinstance(rec.get("text"), str):
        tokens = np.asarray(tok.encode(rec["text"]) + [tok.eod], np.int64)
        mask = np.ones(len(tokens), np.uint8)
    else:
        raise ImageError(f"{where}: expected a \"text\" string or a \"messages\" list")
    n_slots, n_images = int((tokens == tok.special_ids[IMAGE]).sum()), len(rec.get("images", []))
    if n_slots not in (0, n_images):
        raise ImageError(f"{where}: the text has {n_slots} {IMAGE} placeholders for {n_images} images "
                         "(give one per image, or none to put the images first)")
    return tokens, mask


def read_images(rec: dict, base: str, where: str) -> list[bytes]:
    paths = rec.get("images", [])
    if not isinstance(paths, list):
        raise ImageError(f"{where}: \"images\" must be a list of paths, got {type(paths).__name__}")
    out = []
    for k, rel in enumerate(paths):
        path = rel if os.path.isabs(rel) else os.path.join(base, rel)
        at = f"{where}: image {k} '{rel}'"
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError(f"{at}: cannot read '{path}': {e.strerror}") from None
        open_image(data, at)  # decode once: corrupt files fail here, not in the middle of training
        out.append(data)
    return out


def _records(path: str):
    base = os.path.dirname(os.path.abspath(path))
    with open_input(path) as f:
        for lineno, raw in iter_lines(f):
            where = f"{path}:{lineno}"
            if isinstance(raw, BadLine):
                yield where, None, ImageError(f"{where}: {raw.message()}")
                continue
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                yield where, None, ImageError(f"{where}: invalid JSON record: {e}")
                continue
            yield where, (rec, base), None


def preprocess_multimodal(opts: MultimodalOptions) -> MultimodalSummary:
    from megatron_bluelm.data.tokenizer import load_tokenizer

    for path in opts.inputs:
        if not os.path.isfile(path):
            raise ConfigError(f"--input: no such file '{path}'")
    tok = load_tokenizer(opts.tokenizer_model)
    p = opts.output_prefix
    writers = [IndexedWriter(p + TEXT_SUFFIX, token_dtype(tok.vocab_size)), IndexedWriter(p + MASK_SUFFIX, np.uint8),
               IndexedWriter(p + IMAGES_SUFFIX, np.uint8)]
    summary = MultimodalSummary()
    with committed(*writers):
        for path in opts.inputs:
            for where, item, error in _records(path):
                try:
                    if error is not None:
                        raise error
                    rec, base = item
                    tokens, mask = encode_record(rec, tok, where)
                    images = read_images(rec, base, where)
                except ImageError as e:
                    if opts.on_error == "fail":
                        raise ConfigError(f"{e} (--on-error skip skips such records)") from None
                    summary.skipped["bad image" if ": image " in str(e) else "bad record"] += 1
                    summary.examples = (summary.examples + [str(e)])[:10]
                    continue
                _write(writers, tokens, mask, images)
                summary.records += 1
                summary.images += len(images)
                summary.tokens += len(tokens)
        if summary.images == 0:
            raise ConfigError(f"--input: no record has an image ({', '.join(opts.inputs)}); "
                              "text-only data goes through tools/preprocess_data.py without --multimodal")
    return summary


def _write(writers, tokens, mask, images) -> None:
    text, loss, imgs = writers
    one = np.array([len(tokens)])
    text.add(tokens, one, np.array([1]))
    loss.add(mask, one, np.array([1]))
    blobs = [np.frombuffer(b, np.uint8) for b in images]
    data = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
    imgs.add(data, np.array([len(b) for b in blobs], np.int32), np.array([len(blobs)]))


def multimodal_main(argv) -> int:
    """``tools/preprocess_data.py --multimodal ...``."""
    from megatron_bluelm.data.tool_cli import run_or_exit_2, subcommand_parser

    p = subcommand_parser("multimodal", __doc__, "image-text JSONL file(s) (.gz / .zst ok)",
                          f"writes PREFIX{{{TEXT_SUFFIX},{MASK_SUFFIX},{IMAGES_SUFFIX}}}.bin/.idx")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="bad record (missing / corrupt image, bad JSON): stop with file:line, or skip it")
    a = p.parse_args(argv)

    def run() -> str:
        summary = preprocess_multimodal(MultimodalOptions(a.input, a.output_prefix, a.tokenizer_model, a.on_error))
        return f"{summary.format()}\nwrote {a.output_prefix}{{{TEXT_SUFFIX},{MASK_SUFFIX},{IMAGES_SUFFIX}}}.bin/.idx"

    return run_or_exit_2(run)
