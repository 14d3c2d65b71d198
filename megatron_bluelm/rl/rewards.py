"""Rewards for RL: rule-based verifiers in a registry, a model-based reward hook, and "hybrid"
combinations weighted per data source (the BlueLM-2.5-3B report mixes verifiable math / exact-answer
data with model-judged data).

Every verifier takes ``(response_text, sample)`` where ``sample`` is the prompt record (``answer``,
``source``, ``thinking_tokens`` …) and returns a float. Malformed outputs never raise: they score 0
(or the verifier's documented minimum).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------- correctness: the shared graders

def answer_part(response: str) -> str:
    """The answer after the think block (eval/graders.py: the one definition)."""
    from megatron_bluelm.eval.graders import answer_part as part

    return part(response)


def _grade(kind: str, response: str, sample: Mapping, **kw) -> float:
    from megatron_bluelm.eval.graders import grade

    return float(grade(kind, response, sample["answer"], **kw))


@register("math_boxed")
def math_boxed(response: str, sample: Mapping) -> float:
    """1 if the last ``\\boxed{}`` of the answer part equals ``sample['answer']`` by value (the
    evaluation's sympy-based math grader: fractions, roots, ``x=`` answers, units, %, sets, ...)."""
    return _grade("math", response, sample, require_boxed=True)


@register("math")
def math_answer(response: str, sample: Mapping) -> float:
    """As ``math_boxed``, but an unboxed final answer ("the answer is 5", the last line) counts too."""
    return _grade("math", response, sample)


@register("exact_match")
def exact_match(response: str, sample: Mapping) -> float:
    """1 if the answer part equals ``sample['answer']`` (case, whitespace, end punctuation ignored)."""
    return _grade("exact", response, sample)


@register("multiple_choice")
def multiple_choice(response: str, sample: Mapping) -> float:
    """1 if the chosen option letter is ``sample['answer']`` (``sample['choices']``: option texts)."""
    return _grade("choice", response, sample, choices=sample.get("choices"))


@register("image_qa")
def image_qa(response: str, sample: Mapping) -> float:
    """1 for a short free-form answer matching ``sample['answer']`` (VQA-style normalization)."""
    return _grade("image_qa", response, sample)


@register("format")
def think_format(response: str, sample: Mapping) -> float:
    """1 for a well-formed response *under our chat template*, else 0.

    The template's generation prompt already opens the think block (``<|assistant|>\\n<think>\\n`` in
    thinking mode) or holds an empty one (non-thinking), so a response must never open ``<think>``
    itself. Thinking prompts (``sample['thinking']``, default True when a budget other than 0 applies):
    exactly one ``</think>`` closing the block, then a non-empty answer. Non-thinking prompts: no think
    tags at all and a non-empty answer."""
    if THINK_OPEN in response:
        return 0.0
    if not _thinking(sample):
        return float(THINK_CLOSE not in response and response.strip() != "")
    if response.count(THINK_CLOSE) != 1:
        return 0.0
    return float(response.split(THINK_CLOSE, 1)[1].strip() != "")


def _thinking(sample: Mapping) -> bool:
    if "thinking" in sample:
        return bool(sample["thinking"])
    return sample.get("thinking_budget", None) != 0


@register("length_penalty")
def length_penalty(response: str, sample: Mapping) -> float:
    """Thinking-budget shaping: -1 when the budget had to force ``</think>`` (``sample['forced_close']``);
    otherwise 0, or a linear ramp down to -1 over the last ``sample['budget_buffer']`` tokens before
    the budget (``rl.budget_buffer``; 0 = only the forced close is penalised). Generation never lets
    thinking exceed the budget, so "over budget" is what the forced close means."""
    budget = sample.get("thinking_budget")
    if not budget:
        return 0.0
    if sample.get("forced_close"):
        return -1.0
    buffer = min(int(sample.get("budget_buffer", 0) or 0), budget)
    used = int(sample.get("thinking_tokens", 0))
    if buffer <= 0 or used <= budget - buffer:
        return 0.0
    return -min(1.0, (used - (budget - buffer)) / buffer)


@register("overlong")
def overlong(response: str, sample: Mapping) -> float:
    """DAPO's soft overlong punishment on the response length L (generated tokens): 0 for
    L <= L_max - buffer, linear to -1 at L_max, -1 when generation was cut (``finish_reason`` length);
    L_max = ``sample['max_new_tokens']``, buffer = ``sample['overlong_buffer']`` (``rl.overlong_buffer``)."""
    if sample.get("finish_reason") == "length":
        return -1.0
    limit = sample.get("max_new_tokens")
    buffer = int(sample.get("overlong_buffer", 0) or 0)
    used = int(sample.get("response_tokens", 0))
    if not limit or buffer <= 0 or used <= limit - buffer:
        return 0.0
    return -min(1.0, (used - (limit - buffer)) / buffer)


# ---------------------------------------------------------------- combination

MODEL = "model"


@dataclass
class HybridReward:
    """Weighted sum of rewards, chosen per data source (``sample['source']``); ``default`` applies to
    sources not listed. A ``model`` entry calls ``model_reward(responses, samples)`` once per batch,
    on the samples whose source uses it.

    ``components`` is the fixed, sorted list of every reward name any source uses: each sample's
    result has all of them (NaN where its source does not use one), so statistics reduced over
    data-parallel ranks line up component by component whatever mix of sources a rank drew."""

    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    default: dict[str, float] = field(default_factory=lambda: {"exact_match": 1.0})
    model_reward: Optional[Callable[[list, list], list]] = None

    def __post_init__(self):
        for source, ws in [("default", self.default), *self.weights.items()]:
            if not isinstance(ws, Mapping) or not ws:
                raise ConfigError(f"rl.rewards[{source}]: expected a non-empty mapping of reward name -> weight")
            for name, w in ws.items():
                if name != MODEL and name not in REGISTRY:
                    raise ConfigError(f"rl.rewards[{source}]: unknown reward {name!r}; known: "
                                      f"{sorted([*REGISTRY, MODEL])}")
                if name == MODEL and self.model_reward is None:
                    raise ConfigError(f"rl.rewards[{source}]: 'model' reward needs a reward model "
                                      "(rl.reward_model: a checkpoint of stages/reward_model.py)")
                if not isinstance(w, (int, float)):
                    raise ConfigError(f"rl.rewards[{source}].{name}: weight must be a number, got {w!r}")
        self.components = sorted({n for ws in [self.default, *self.weights.values()] for n in ws})

    @property
    def uses_model(self) -> bool:
        return MODEL in self.components

    def weights_for(self, sample: Mapping) -> dict[str, float]:
        return self.weights.get(sample.get("source", ""), self.default)

    def __call__(self, responses: list[str], samples: list[Mapping]) -> list[dict[str, float]]:
        """Per sample: {'reward': total, <component>: value or NaN (unused by its source), ...}."""
        model_scores = {}
        wanted = [i for i, s in enumerate(samples) if MODEL in self.weights_for(s)]
        if wanted:
            scores = self.model_reward([responses[i] for i in wanted], [samples[i] for i in wanted])
            model_scores = dict(zip(wanted, scores))
        out = []
        for i, (resp, sample) in enumerate(zip(responses, samples)):
            ws = self.weights_for(sample)
            parts = {name: math.nan for name in self.components}
            for name in ws:
                parts[name] = float(model_scores[i]) if name == MODEL else float(REGISTRY[name](resp, sample))
            total = sum(ws[k] * parts[k] for k in ws)
            out.append({"reward": total if math.isfinite(total) else 0.0, **parts})
        return out
