"""Prompt sources for RL. A prompt record is a dict:

    {"prompt": "12+5="}  or  {"messages": [{"role": "user", "content": "..."}]}   (chat template)
    "answer": reference for the verifiers, "source": which reward mix applies (default: the task
    name), optional "thinking_budget" (overrides rl.thinking_budget; 0 = non-thinking).

``ArithmeticTask`` is the built-in toy (a + b with operands up to N: ``rl.task: arithmetic`` or
``arithmetic:N``, default 9; the answer, then end of text); ``JsonlTask`` reads records from a JSONL
file. Both draw prompts deterministically from (seed, step).
"""
from __future__ import annotations

import json
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
    def __init__(self, path: str):
        self.name = path
        self.items = []
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                    if not isinstance(rec, dict) or ("prompt" not in rec and "messages" not in rec):
                        raise ConfigError(f"{path}:{lineno}: a record needs 'prompt' or 'messages'")
                    if "answer" not in rec:
                        raise ConfigError(f"{path}:{lineno}: a record needs 'answer' for the verifiers")
                    rec.setdefault("source", "default")
                    self.items.append(rec)
        except FileNotFoundError:
            raise ConfigError(f"rl.task: no such file '{path}'") from None
        if not self.items:
            raise ConfigError(f"rl.task: '{path}' has no records")

    def records(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        return [dict(rng.choice(self.items)) for _ in range(n)]

    @staticmethod
    def warmup_pair(record: dict, rng: random.Random) -> tuple[str, str]:
        """(prompt, reference answer) for the supervised warm-up."""
        if "prompt" not in record:
            raise ConfigError("rl.warmup_sft_steps needs 'prompt' records (chat records: run the SFT stage)")
        return record["prompt"], str(record["answer"])


def load_task(spec: str):
    name, _, arg = spec.partition(":")
    if name == "arithmetic":
        if arg and not arg.isdigit():
            raise ConfigError(f"rl.task: expected 'arithmetic' or 'arithmetic:N' (N = largest operand), got {spec!r}")
        return ArithmeticTask(int(arg) if arg else 9)
    return JsonlTask(spec)
