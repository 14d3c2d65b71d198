"""SFT data: chat JSONL -> token + loss-mask indexed datasets; packed rows with per-sample boundaries.

Input, one conversation per line::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "thinking": "step by step ...", "content": "the answer"}]}

Each conversation becomes ONE sample rendered by the project's chat template
(``data/chat_template.render_chat``), in one of three variants chosen per sample (seeded):

* thinking      ``<think>`` reasoning ``</think>`` answer                 (share ``think_ratio``)
* budget-aware  ``<think>`` reasoning cut at B tokens ``</think>`` bridge answer (share ``budget_ratio``
                of the thinking samples): teaches the model to answer after a forced close, which
                is what generation with a thinking budget produces;
* non-thinking  an empty think block, then the answer.

Loss only on assistant tokens: everything after an ``<|assistant|>`` token up to and including the
next ``<|end|>``. Written as PREFIX_text_document (tokens) + PREFIX_loss_mask_document (0/1 per
token), both megatron-core IndexedDatasets with identical lengths.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.chat_template import DEFAULT_BRIDGE
from megatron_bluelm.data.indexed_writer import IndexedWriter, committed, token_dtype
from megatron_bluelm.data.jsonl import BadLine, iter_lines, open_input

MASK_SUFFIX = "_loss_mask_document"
TEXT_SUFFIX = "_text_document"


def default_render() -> Callable:
    from megatron_bluelm.data.chat_template import render_chat

    return render_chat


@dataclass
class ChatOptions:
    inputs: list[str]
    output_prefix: str
    tokenizer_model: str
    think_ratio: float = 1.0  # share of samples in thinking mode (the rest: empty think block)
    budget_ratio: float = 0.0  # share of thinking samples cut at a random budget
    bridge_text: str = DEFAULT_BRIDGE
    seed: int = 1234

    def check(self) -> None:
        for name in ("think_ratio", "budget_ratio"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be in [0, 1], got {v}")


def assistant_loss_mask(tokens: np.ndarray, assistant_id: int, end_id: int) -> np.ndarray:
    """1 on tokens after each <|assistant|> up to and including the next <|end|>, else 0."""
    mask = np.zeros(len(tokens), dtype=np.uint8)
    inside = False
    for i, t in enumerate(tokens):
        if inside:
            mask[i] = 1
            inside = t != end_id
        elif t == assistant_id:
            inside = True
    return mask


def make_variant(messages: list, rng: random.Random, opts: ChatOptions, tok) -> tuple[list, bool]:
    """(messages to render, thinking flag) for one conversation."""
    has_thinking = any(m.get("thinking") for m in messages if m.get("role") == "assistant")
    thinking = has_thinking and rng.random() < opts.think_ratio
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant":
            if not thinking:
                m.pop("thinking", None)
            elif m.get("thinking") and rng.random() < opts.budget_ratio:
                m["thinking"], m["content"] = _cut_thinking(m["thinking"], m["content"], rng, opts, tok)
        out.append(m)
    return out, thinking


def _cut_thinking(thinking: str, content: str, rng: random.Random, opts: ChatOptions, tok) -> tuple[str, str]:
    ids = tok.encode(thinking)
    if len(ids) < 2:
        return thinking, content
    budget = rng.randrange(0, len(ids))  # strictly shorter than the full reasoning
    return tok.decode(ids[:budget]), opts.bridge_text.lstrip("\n") + content


def encode_conversation(messages: list, thinking: bool, tok, render: Callable) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(tok.encode(render(messages, thinking=thinking)), dtype=np.int64)
    mask = assistant_loss_mask(tokens, tok.special_ids["<|assistant|>"], tok.special_ids["<|end|>"])
    return tokens, mask


def _conversations(path: str):
    with open_input(path) as f:
        for lineno, raw in iter_lines(f):
            if isinstance(raw, BadLine):
                raise ConfigError(f"{path}:{lineno}: {raw.message()}")
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                messages = rec["messages"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{lineno}: expected {{\"messages\": [...]}}: {e}") from None
            if not any(m.get("role") == "assistant" for m in messages):
                raise ConfigError(f"{path}:{lineno}: conversation has no assistant turn (nothing to learn)")
            yield messages


def preprocess_chat(opts: ChatOptions, render: Callable | None = None) -> dict:
    """Write the token and loss-mask datasets; returns counts per variant."""
    from megatron_bluelm.data.tokenizer import load_tokenizer

    opts.check()
    render = render or default_render()
    tok = load_tokenizer(opts.tokenizer_model)
    rng = random.Random(opts.seed)
    text = IndexedWriter(opts.output_prefix + TEXT_SUFFIX, token_dtype(tok.vocab_size))
    mask = IndexedWriter(opts.output_prefix + MASK_SUFFIX, np.uint8)
    counts = {"samples": 0, "thinking": 0, "loss_tokens": 0, "tokens": 0}
    with committed(text, mask):
        for path in opts.inputs:
            for messages in _conversations(path):
                variant, thinking = make_variant(messages, rng, opts, tok)
                tokens, loss = encode_conversation(variant, thinking, tok, render)
                one = np.array([len(tokens)])
                text.add(tokens, one, np.array([1]))
                mask.add(loss, one, np.array([1]))
                counts["samples"] += 1
                counts["thinking"] += int(thinking)
                counts["loss_tokens"] += int(loss.sum())
                counts["tokens"] += len(tokens)
    return counts


# ----------------------------------------------------------------------------- the command line

def chat_main(argv) -> int:
    """``tools/preprocess_data.py --chat ...``: conversations JSONL -> SFT token + loss-mask datasets."""
    from megatron_bluelm.data.tool_cli import run_or_exit_2, subcommand_parser

    p = subcommand_parser("chat", __doc__, "conversation JSONL file(s) (.gz / .zst ok)",
                          f"writes PREFIX{TEXT_SUFFIX}.bin/.idx and PREFIX{MASK_SUFFIX}.bin/.idx")
    p.add_argument("--think-ratio", type=float, default=1.0, help="share of samples in thinking mode")
    p.add_argument("--budget-ratio", type=float, default=0.0, help="share of thinking samples cut at a budget")
    p.add_argument("--bridge-text", default=DEFAULT_BRIDGE, help="text after a budget-forced </think>")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    opts = ChatOptions(a.input, a.output_prefix, a.tokenizer_model, a.think_ratio, a.budget_ratio,
                       a.bridge_text, a.seed)
    return run_or_exit_2(lambda: f"wrote {opts.output_prefix}{TEXT_SUFFIX} and {opts.output_prefix}{MASK_SUFFIX}: "
                                 f"{preprocess_chat(opts)}")


# ----------------------------------------------------------------------------- a toy task

TOY_WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "star")


def toy_reverse_conversations(n: int, seed: int = 0, length: tuple[int, int] = (2, 4)) -> list[dict]:
    """'reverse: a b c' -> thinking spells out the reversal, answer 'c b a' (tests, examples)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(TOY_WORDS) for _ in range(rng.randint(*length))]
        rev = " ".join(reversed(words))
        out.append({"messages": [
            {"role": "user", "content": "reverse: " + " ".join(words)},
            {"role": "assistant", "thinking": f"last first: {rev}", "content": rev},
        ]})
    return out
