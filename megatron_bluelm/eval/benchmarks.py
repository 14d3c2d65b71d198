"""Benchmarks: JSONL files of questions with references, read into ``Item``s (bad lines named file:line).

One item per line (docs/EVALUATION.md has the full format)::

    {"id": "a-17", "question": "What is 3+5+2?", "answer": "10", "grader": "math", "level": 2}
    {"question": "Which is larger?", "choices": ["17", "71"], "answer": "B", "grader": "choice"}
    {"question": "What animal is this?", "images": ["../images/chelsea.jpg"], "answer": ["cat", "kitten"],
     "grader": "image_qa"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}], "answer": "7"}

``question`` (or ``problem``) becomes one user turn; ``messages`` is a chat history ending with a
user turn. ``answer`` is a string, a number or a list of acceptable strings. Files of the common
public sets read as they are: GSM8K (``answer`` ending in ``#### 42``), MATH (``problem`` +
``solution`` with a ``\\boxed{}``), multiple-choice sets with ``options`` instead of ``choices``.
``grader`` defaults to the benchmark's default (``math``). Image paths are relative to the file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.eval.graders import KINDS, last_boxed

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "eval")
# bundled sets (megatron_bluelm/assets/eval/, made by ``python -m megatron_bluelm.eval.make_sets``)
BUNDLED = {"arithmetic": "arithmetic.jsonl", "word_problems": "word_problems.jsonl",
           "choice": "choice.jsonl", "images": "images.jsonl"}
LETTERS = "ABCDEFGHIJ"


@dataclass
class Item:
    id: str
    where: str  # file:line, for messages about this item
    messages: list
    answer: list  # acceptable references (strings)
    grader: str
    choices: Optional[list] = None
    images: list = field(default_factory=list)  # absolute paths
    level: Optional[int] = None


@dataclass
class Benchmark:
    name: str
    path: str
    items: list


def resolve(spec: str) -> tuple[str, str]:
    """``arithmetic`` (bundled) | ``path.jsonl`` | ``name=path.jsonl`` -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = spec, spec
        if spec in BUNDLED:
            path = os.path.join(ASSETS, BUNDLED[spec])
        else:
            name = os.path.splitext(os.path.basename(spec))[0]
    if not os.path.isfile(path):
        raise ConfigError(f"benchmark {spec!r}: no such file '{path}' (bundled sets: {', '.join(BUNDLED)})")
    return name, path


def load_benchmark(spec: str, default_grader: str = "math", limit: Optional[int] = None) -> Benchmark:
    name, path = resolve(spec)
    items, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: invalid JSON ({e.msg})") from None
            item = parse_item(rec, where, default_grader, os.path.dirname(os.path.abspath(path)), len(items))
            if item.id in seen:
                raise ConfigError(f"{where}: id {item.id!r} already used at line {seen[item.id]}")
            seen[item.id] = lineno
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise ConfigError(f"benchmark {spec!r}: '{path}' has no items")
    return Benchmark(name, path, items)


def parse_item(rec, where: str, default_grader: str, base_dir: str, index: int) -> Item:
    if not isinstance(rec, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    grader = rec.get("grader", default_grader)
    if grader not in KINDS:
        raise ConfigError(f"{where}: grader {grader!r} is not one of {KINDS}")
    answer = _reference(rec, where)
    choices = rec.get("choices", rec.get("options"))
    if choices is not None:
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise ConfigError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} options")
        if grader == "choice":
            letters = LETTERS[:len(choices)]
            answer = [LETTERS[int(a)] if a.isdigit() else a.strip().strip("()").upper() for a in answer]
            bad = [a for a in answer if a not in letters]
            if bad:
                raise ConfigError(f"{where}: answer {bad[0]!r} is not one of the option letters {letters}")
    elif grader == "choice":
        raise ConfigError(f"{where}: grader 'choice' needs 'choices' (or 'options')")
    messages = _messages(rec, where, choices)
    images = rec.get("images", [rec["image"]] if "image" in rec else [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ConfigError(f"{where}: 'images' must be a list of file paths")
    images = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p)) for p in images]
    for p in images:
        if not os.path.isfile(p):
            raise ConfigError(f"{where}: image '{p}' does not exist")
    level = rec.get("level")
    if level is not None and not isinstance(level, int):
        raise ConfigError(f"{where}: 'level' must be an integer")
    return Item(str(rec.get("id", index)), where, messages, answer, grader, choices, images, level)


def _reference(rec: dict, where: str) -> list:
    if "answer" in rec:
        ans = rec["answer"]
        if isinstance(ans, str) and "\n#### " in "\n" + ans:  # GSM8K: worked solution, then #### 42
            ans = ans.rsplit("#### ", 1)[1].strip()
    elif "solution" in rec:  # MATH: the boxed answer of the solution
        ans = last_boxed(str(rec["solution"]))
        if ans is None:
            raise ConfigError(f"{where}: 'solution' has no \\boxed{{}} answer; add an 'answer' field")
    else:
        raise ConfigError(f"{where}: an item needs 'answer' (or a MATH-style 'solution')")
    answers = ans if isinstance(ans, list) else [ans]
    if not answers or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers):
        raise ConfigError(f"{where}: 'answer' must be a string, a number or a non-empty list of them")
    return [str(a) for a in answers]


def _messages(rec: dict, where: str, choices: Optional[list]) -> list:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        if msgs[-1].get("role") != "user":
            raise ConfigError(f"{where}: 'messages' must end with a user turn (the question)")
        for i, m in enumerate(msgs):
            if m.get("role") not in ("system", "user", "assistant", "tool") or not isinstance(m.get("content"), str):
                raise ConfigError(f"{where}: messages[{i}] needs a role (system/user/assistant/tool) and a "
                                  "string content")
        msgs = [dict(m) for m in msgs]
    else:
        question = rec.get("question", rec.get("problem"))
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{where}: an item needs a non-empty 'question' (or 'problem', or 'messages')")
        msgs = [{"role": "system", "content": rec["system"]}] if isinstance(rec.get("system"), str) else []
        msgs.append({"role": "user", "content": question})
    if choices is not None:
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        msgs[-1]["content"] = f"{msgs[-1]['content']}\n{options}"
    return msgs
