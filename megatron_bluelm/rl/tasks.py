"""Prompt sources for RL. A prompt record is a dict:

    {"prompt": "12+5="}  or  {"messages": [{"role": "user", "content": "..."}]}   (chat template)
    "answer": reference for the verifiers, "source": which reward mix applies (default: the task
    name), optional "thinking_budget" (overrides rl.thinking_budget; 0 = non-thinking), optional
    "images": [paths] (relative to the JSONL's folder; the multimodal model only).

``ArithmeticTask`` is the built-in toy (a + b with operands up to N: ``rl.task: arithmetic`` or
``arithmetic:N``, default 9; the answer, then end of text); ``JsonlTask`` reads records from a JSONL
file. Both draw prompts deterministically from (seed, step).
"""
from __future__ import annotations

import os
import random

from megatron_bluelm.config.errors import ConfigError


class ArithmeticTask:
    name = "arithmetic"

    def __init__(self, max_operand: int = 9):
        self.max_operand = max_operand

    def records(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
            out.append({"prompt": f"{a}+{b}=", "answer": str(a + b), "source": self.name})
        return out

    def warmup_pair(self, record: dict, rng: random.Random) -> tuple[str, str]:
        """(prompt, completion) for the supervised warm-up: a *random* sum in the answer range, so the
        warm-up teaches the format (a number, then end of text) but not the arithmetic, which is left
        to RL. The reward therefore starts near chance (1 / (2N + 1))."""
        return record["prompt"], str(rng.randint(0, 2 * self.max_operand))


class JsonlTask:
    def __init__(self, path: str, source_ratios: dict | None = None):
        self.name = path
        self.items = []
        self.source_ratios = dict(source_ratios or {})
        from megatron_bluelm.data.jsonl import read_json_records

        for lineno, rec in read_json_records(path, f"rl.task: no such file '{path}'"):
            if not isinstance(rec, dict) or ("prompt" not in rec and "messages" not in rec):
                raise ConfigError(f"{path}:{lineno}: a record needs 'prompt' or 'messages'")
            if "answer" not in rec:
                raise ConfigError(f"{path}:{lineno}: a record needs 'answer' for the verifiers")
            rec.setdefault("source", "default")
            if "images" in rec:
                rec["images"] = _image_paths(rec["images"], path, lineno)
            self.items.append(rec)
        if not self.items:
            raise ConfigError(f"rl.task: '{path}' has no records")
        self.by_source: dict[str, list] = {}
        for rec in self.items:
            self.by_source.setdefault(rec["source"], []).append(rec)
        unknown = sorted(set(self.source_ratios) - set(self.by_source))
        if unknown:
            raise ConfigError(f"rl.source_ratios: sources {unknown} have no records in '{path}' "
                              f"(it has {sorted(self.by_source)})")
        if any(not isinstance(v, (int, float)) or v < 0 for v in self.source_ratios.values()) or \
                (self.source_ratios and sum(self.source_ratios.values()) <= 0):
            raise ConfigError(f"rl.source_ratios: shares must be numbers >= 0 with a positive sum, got "
                              f"{self.source_ratios}")

    def records(self, n: int, seed: int) -> list[dict]:
        """``n`` records drawn with replacement; with ``source_ratios`` each draw first picks a source
        with those shares (sources not listed are not drawn), then a record of it."""
        rng = random.Random(seed)
        if not self.source_ratios:
            return [dict(rng.choice(self.items)) for _ in range(n)]
        names = sorted(self.source_ratios)
        shares = [float(self.source_ratios[k]) for k in names]
        return [dict(rng.choice(self.by_source[rng.choices(names, shares)[0]])) for _ in range(n)]

    @staticmethod
    def warmup_pair(record: dict, rng: random.Random) -> tuple[str, str]:
        """(prompt, reference answer) for the supervised warm-up."""
        if "prompt" not in record:
            raise ConfigError("rl.warmup_sft_steps needs 'prompt' records (chat records: run the SFT stage)")
        return record["prompt"], str(record["answer"])


def _image_paths(images, path: str, lineno: int) -> list[str]:
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ConfigError(f"{path}:{lineno}: 'images' must be a list of image file paths")
    base = os.path.dirname(os.path.abspath(path))
    out = [i if os.path.isabs(i) else os.path.join(base, i) for i in images]
    for i, full in zip(images, out):
        if not os.path.isfile(full):
            raise ConfigError(f"{path}:{lineno}: image file '{i}' not found (looked for '{full}')")
    return out


def load_task(spec: str, source_ratios: dict | None = None):
    name, _, arg = spec.partition(":")
    if name == "arithmetic":
        if arg and not arg.isdigit():
            raise ConfigError(f"rl.task: expected 'arithmetic' or 'arithmetic:N' (N = largest operand), got {spec!r}")
        if source_ratios:
            raise ConfigError("rl.source_ratios: the built-in arithmetic task has one source; use a JSONL task")
        return ArithmeticTask(int(arg) if arg else 9)
    return JsonlTask(spec, source_ratios)
