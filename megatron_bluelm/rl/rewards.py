"""Rewards for RL: rule-based verifiers in a registry, a model-based reward hook, and "hybrid"
combinations weighted per data source (the BlueLM-2.5-3B report mixes verifiable math / exact-answer
data with model-judged data).

Every verifier takes ``(response_text, sample)`` where ``sample`` is the prompt record (``answer``,
``source``, ``thinking_tokens`` …) and returns a float. Malformed outputs never raise: they score 0
(or the verifier's documented minimum).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Mapping, Optional

from megatron_bluelm.config.errors import ConfigError

Verifier = Callable[[str, Mapping], float]
REGISTRY: dict[str, Verifier] = {}

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def register(name: str):
    def deco(fn: Verifier) -> Verifier:
        REGISTRY[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------- answer extraction / normalization

def answer_part(response: str) -> str:
    """The text after the think block (the whole response when there is none)."""
    return response.split(THINK_CLOSE, 1)[1] if THINK_CLOSE in response else response


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (nested braces allowed); None if absent or unbalanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|mathrm|mbox)\{([^{}]*)\}")


def normalize_math(ans: str) -> str:
    """Canonical form for comparing final answers: LaTeX wrappers, spaces, $ and trailing
    punctuation removed, \\frac{a}{b} -> a/b, thousands separators dropped."""
    s = ans.strip()
    s = _TEXT.sub(r"\1", s)
    s = _FRAC.sub(r"(\1)/(\2)", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "$", " "):
        s = s.replace(token, "")
    s = s.rstrip(".").replace("{", "").replace("}", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> Optional[Fraction]:
    s = s.replace("(", "").replace(")", "")
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(pred: str, ref: str) -> bool:
    a, b = normalize_math(pred), normalize_math(ref)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and x == y


# ---------------------------------------------------------------- verifiers

@register("math_boxed")
def math_boxed(response: str, sample: Mapping) -> float:
    """1 if the last \\boxed{} after the think block equals ``sample['answer']`` (normalized)."""
    boxed = last_boxed(answer_part(response))
    return float(boxed is not None and math_equal(boxed, str(sample["answer"])))


@register("exact_match")
def exact_match(response: str, sample: Mapping) -> float:
    """1 if the answer part, stripped (and case-folded), equals ``sample['answer']``."""
    return float(answer_part(response).strip().casefold() == str(sample["answer"]).strip().casefold())


@register("format")
def think_format(response: str, sample: Mapping) -> float:
    """1 for exactly one well-ordered think block followed by a non-empty answer; else 0."""
    if response.count(THINK_OPEN) != 1 or response.count(THINK_CLOSE) != 1:
        return 0.0
    head, rest = response.split(THINK_OPEN, 1)
    thought, answer = rest.split(THINK_CLOSE, 1)
    return float(head.strip() == "" and answer.strip() != "")


@register("length_penalty")
def length_penalty(response: str, sample: Mapping) -> float:
    """0 within budget, down to -1 linearly as thinking exceeds ``sample['thinking_budget']`` by up to
    100% (the budget a prompt was given; no budget -> 0)."""
    budget = sample.get("thinking_budget")
    used = sample.get("thinking_tokens", 0)
    if not budget or used <= budget:
        return 0.0
    return -min(1.0, (used - budget) / budget)


# ---------------------------------------------------------------- combination

@dataclass
class HybridReward:
    """Weighted sum of verifiers, chosen per data source (``sample['source']``); ``default`` applies to
    sources not listed. A ``model`` entry calls ``model_reward(responses, samples)`` in batch."""

    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    default: dict[str, float] = field(default_factory=lambda: {"exact_match": 1.0})
    model_reward: Optional[Callable[[list, list], list]] = None

    def __post_init__(self):
        for source, ws in [("default", self.default), *self.weights.items()]:
            for name in ws:
                if name != "model" and name not in REGISTRY:
                    raise ConfigError(f"rl.rewards[{source}]: unknown reward {name!r}; known: {sorted(REGISTRY)}")
                if name == "model" and self.model_reward is None:
                    raise ConfigError(f"rl.rewards[{source}]: 'model' reward needs a model_reward hook")

    def __call__(self, responses: list[str], samples: list[Mapping]) -> list[dict[str, float]]:
        """Per sample: {'reward': total, <name>: component, ...}."""
        model_scores = None
        out = []
        for i, (resp, sample) in enumerate(zip(responses, samples)):
            ws = self.weights.get(sample.get("source", ""), self.default)
            parts = {}
            for name in ws:
                if name == "model":
                    if model_scores is None:
                        model_scores = self.model_reward(responses, samples)
                    parts[name] = float(model_scores[i])
                else:
                    parts[name] = float(REGISTRY[name](resp, sample))
            total = sum(ws[k] * v for k, v in parts.items())
            out.append({"reward": total if math.isfinite(total) else 0.0, **parts})
        return out
