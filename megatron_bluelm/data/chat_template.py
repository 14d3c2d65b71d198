"""The chat template: the ONE definition, used by SFT data, generation and the Hugging Face export.

    <|system|>\\n{system}<|end|>\\n
    <|user|>\\n{question}<|end|>\\n
    <|assistant|>\\n<think>\\n{reasoning}\\n</think>\\n{answer}<|end|>\\n

Every assistant turn opens with a think block: in thinking mode it holds the message's ``thinking``
text; in non-thinking mode (and for turns without reasoning) it is empty, ``<think>\\n\\n</think>\\n``.
The mode is a flag of the call: ``render_chat(..., thinking=True)`` here, ``enable_thinking=True`` in
``tokenizer.apply_chat_template`` (default: thinking). The generation prompt is the open assistant
turn: ``<|assistant|>\\n<think>\\n`` (thinking) or ``<|assistant|>\\n<think>\\n\\n</think>\\n``.

No BOS is added: our tokenizer does not add one, and pretraining documents start without it.
``CHAT_TEMPLATE`` (Jinja, for HF) and ``render_chat`` (Python) produce the same text; a test checks it.
"""
from __future__ import annotations

ROLES = ("system", "user", "assistant", "tool")
END = "<|end|>"
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n"
# After a budget-forced close, before the answer: SFT's budget-aware samples and generation's
# forced close both take it from here.
DEFAULT_BRIDGE = "\nTime is up; the answer:\n"

CHAT_TEMPLATE = (
    "{%- set thinking = enable_thinking if enable_thinking is defined else true -%}"
    "{%- for m in messages -%}"
    "{{ '<|' + m['role'] + '|>\\n' }}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{ '<think>\\n' + ((m['thinking'] if thinking and m['thinking'] is defined and m['thinking'] else '')) "
    "+ '\\n</think>\\n' }}"
    "{%- endif -%}"
    "{{ m['content'] + '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|assistant|>\\n<think>\\n' if thinking else '<|assistant|>\\n<think>\\n\\n</think>\\n' }}"
    "{%- endif -%}"
)


def _check(message: dict, i: int) -> None:
    if message.get("role") not in ROLES:
        raise ValueError(f"messages[{i}]: role {message.get('role')!r} is not one of {ROLES}")
    if not isinstance(message.get("content"), str):
        raise ValueError(f"messages[{i}]: 'content' must be a string")


def think_block(reasoning: str) -> str:
    return THINK_OPEN + reasoning + THINK_CLOSE


def render_chat(messages: list[dict], thinking: bool = True, add_generation_prompt: bool = False) -> str:
    """The conversation as text (tokenize it with the project tokenizer); see the module docstring."""
    out = []
    for i, m in enumerate(messages):
        _check(m, i)
        out.append(f"<|{m['role']}|>\n")
        if m["role"] == "assistant":
            out.append(think_block((m.get("thinking") or "") if thinking else ""))
        out.append(m["content"] + END + "\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n" + (THINK_OPEN if thinking else think_block("")))
    return "".join(out)


def budget_close_text(bridge_text: str, message: str = "") -> str:
    """What follows the thinking when a budget closes it: the optional budget message, ``\\n</think>\\n``,
    then the bridge — the same text SFT's budget-aware samples hold there (``data/sft.py``)."""
    return message + THINK_CLOSE + bridge_text.lstrip("\n")


def encode_continuation(tok, text: str) -> list[int]:
    """Token ids of ``text`` as it tokenizes *after* earlier tokens (no SentencePiece dummy-prefix
    "▁" at its start), found by encoding it behind an anchor whose tokens are a prefix."""
    for anchor in ("x", "0", "a", ".", "Z"):
        head = tok.encode(anchor)
        full = tok.encode(anchor + text)
        if full[:len(head)] == head:
            return full[len(head):]
    raise ValueError(f"cannot tokenize {text!r} as a continuation with this tokenizer")


def budget_close_ids(tok, bridge_text: str, message: str = "") -> list[int]:
    """The tokens generation forces when the thinking budget is spent (one source of truth)."""
    return encode_continuation(tok, budget_close_text(bridge_text, message))
