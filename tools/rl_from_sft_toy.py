#!/usr/bin/env python
"""Data for the RL-from-SFT toy (docs/RL.md "The toy"): reverse a few letters.

    python tools/rl_from_sft_toy.py --out outputs/rl_from_sft_toy
    python -m megatron_bluelm.stages.sft --config examples/rl_from_sft_toy_sft.yaml
    python -m megatron_bluelm.stages.rl --config examples/rl_from_sft_toy.yaml \\
        --pretrained outputs/rl_from_sft_toy/sft_ckpt

The prompt is "reverse: c a f" (3 distinct letters of a..h: 336 instances); the right answer is the
reversal "f a c". The SFT conversations answer a share ``--correct`` of their prompts with the
reversal and the rest with a copy of the input ("c a f"), a wrong rule on the same prompts: the SFT
model has both behaviours, and its first answer token (the last letter or the first) picks one.
RL with the exact-match reward has to select the right behaviour; since it is one choice shared by
every prompt, what it learns carries over to prompts it never saw.

The instances are split once (seeded): the held-out prompts (``--heldout``) are in neither the SFT
data nor the RL prompts. Writes under ``--out``: ``chats.jsonl`` (one SFT conversation per training
instance), the SFT datasets ``sft_text_document`` and its loss mask (non-thinking, as
``tools/preprocess_data.py --chat --think-ratio 0`` writes them), and the RL task records
``rl_train.jsonl`` / ``rl_heldout.jsonl`` (chat prompts, answer, ``thinking_budget: 0``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LETTERS = "abcdefgh"


def instances(length: int, alphabet: str = LETTERS) -> list[tuple[str, ...]]:
    """Every sequence of ``length`` distinct letters: the first and last differ, so the first answer
    token tells the reversal from the copy."""
    return list(itertools.permutations(alphabet, length))


def _prompt(letters) -> list[dict]:
    return [{"role": "user", "content": "reverse: " + " ".join(letters)}]


def toy_split(length: int = 3, heldout: int = 112, seed: int = 0, alphabet: str = LETTERS) -> tuple[list, list]:
    """(training instances, held-out instances): a seeded shuffle of every instance."""
    items = instances(length, alphabet)
    if not 0 < heldout < len(items):
        raise ValueError(f"--heldout must be in 1..{len(items) - 1} for length {length}, got {heldout}")
    random.Random(seed).shuffle(items)
    return items[heldout:], items[:heldout]


def sft_conversations(train: list, correct: float, seed: int = 0) -> list[dict]:
    """One conversation per training instance; a share ``correct`` of them (exactly, in a seeded
    order) answered by the reversal, the rest by the copy."""
    rows = list(train)
    n_right = round(correct * len(rows))
    right = [True] * n_right + [False] * (len(rows) - n_right)
    rng = random.Random(seed + 1)
    rng.shuffle(right)
    rng.shuffle(rows)
    return [{"messages": _prompt(w) + [{"role": "assistant",
                                        "content": " ".join(reversed(w) if r else w)}]}
            for w, r in zip(rows, right)]


def task_records(items: list) -> list[dict]:
    return [{"messages": _prompt(w), "answer": " ".join(reversed(w)), "thinking_budget": 0} for w in items]


def _write_jsonl(path: str, records: list) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_toy_data(out: str, length: int = 3, heldout: int = 112, correct: float = 0.5,
                   seed: int = 0, tokenizer_model: str | None = None, alphabet: str = LETTERS) -> dict:
    """Write the toy's files under ``out``; returns their paths and the SFT counts."""
    from megatron_bluelm.config.data import BUNDLED_TOKENIZER
    from megatron_bluelm.data.sft import ChatOptions, preprocess_chat

    if not 0.0 <= correct <= 1.0:
        raise ValueError(f"--correct must be in [0, 1], got {correct}")
    os.makedirs(out, exist_ok=True)
    train, held = toy_split(length, heldout, seed, alphabet)
    chats = _write_jsonl(os.path.join(out, "chats.jsonl"), sft_conversations(train, correct, seed))
    counts = preprocess_chat(ChatOptions([chats], os.path.join(out, "sft"), tokenizer_model or BUNDLED_TOKENIZER,
                                         think_ratio=0.0, seed=seed))
    return {"chats": chats, "sft_prefix": os.path.join(out, "sft_text_document"),
            "rl_train": _write_jsonl(os.path.join(out, "rl_train.jsonl"), task_records(train)),
            "rl_heldout": _write_jsonl(os.path.join(out, "rl_heldout.jsonl"), task_records(held)),
            "train_instances": len(train), "heldout_instances": len(held), "sft": counts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/rl_from_sft_toy", help="folder for the data files")
    p.add_argument("--length", type=int, default=3, help="letters per prompt")
    p.add_argument("--heldout", type=int, default=112, help="instances held out from SFT and RL")
    p.add_argument("--correct", type=float, default=0.5, help="share of SFT answers that reverse (the rest copy)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        res = write_toy_data(a.out, a.length, a.heldout, a.correct, a.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
