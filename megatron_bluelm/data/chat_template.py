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

import json

ROLES = ("system", "user", "assistant", "tool")
END = "<|end|>"
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n"
# After a budget-forced close, before the answer: SFT's budget-aware samples and generation's
# forced close both take it from here.
DEFAULT_BRIDGE = "\nTime is up; the answer:\n"

TOOLS_HEADER = "# Tools\nCall a tool with one JSON object per line: {\"name\": ..., \"arguments\": {...}}\n"

# Content may be a string, None (an assistant turn that only calls tools) or a list of parts
# ({"type": "text", "text": ...} / {"type": "image"}: the OpenAI and multimodal message format); an
# assistant's tool_calls follow its content as one JSON line each; `tools` become a "# Tools" section
# of the system turn (a system turn is added when there is none). Unknown roles raise.
CHAT_TEMPLATE = (
    "{%- set thinking = enable_thinking if enable_thinking is defined else true -%}"
    "{%- macro render_content(m, i) -%}"
    "{%- set c = m['content'] if m['content'] is defined else none -%}"
    "{%- if c is none -%}"
    "{%- elif c is string -%}{{ c }}"
    "{%- else -%}{%- for p in c -%}"
    "{%- if p['type'] == 'text' -%}{{ p['text'] }}"
    "{%- elif p['type'] in ['image', 'image_url'] -%}{{ '<image>' }}"
    "{%- else -%}{{ raise_exception('messages[' ~ i ~ ']: content part type ' ~ p['type'] ~ "
    "' is not text or image') }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro render_calls(m, has_text) -%}"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] -%}"
    "{%- for call in m['tool_calls'] -%}"
    "{{ '\\n' if has_text or not loop.first else '' }}"
    "{{ (call['function'] if call['function'] is defined else call) | tojson }}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set tool_lines = namespace(text='') -%}"
    "{%- if tools is defined and tools -%}"
    "{%- for t in tools -%}{%- set tool_lines.text = tool_lines.text + (t | tojson) + '\\n' -%}{%- endfor -%}"
    "{%- set tool_lines.text = '" + TOOLS_HEADER.replace("\n", "\\n").replace('"', '\\"') + "' + tool_lines.text -%}"
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|system|>\\n' + tool_lines.text.rstrip('\\n') + '<|end|>\\n' }}"
    "{%- endif -%}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('messages[' ~ loop.index0 ~ ']: role ' ~ m['role'] ~ "
    "' is not one of system, user, assistant, tool') }}"
    "{%- endif -%}"
    "{{ '<|' + m['role'] + '|>\\n' }}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{ '<think>\\n' + ((m['thinking'] if thinking and m['thinking'] is defined and m['thinking'] else '')) "
    "+ '\\n</think>\\n' }}"
    "{%- endif -%}"
    "{%- set text = render_content(m, loop.index0) -%}"
    "{{ text }}{{ render_calls(m, text | length > 0) }}"
    "{%- if loop.first and m['role'] == 'system' and tool_lines.text -%}"
    "{{ ('\\n\\n' if text | length > 0 else '') + tool_lines.text.rstrip('\\n') }}"
    "{%- endif -%}"
    "{{ '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|assistant|>\\n<think>\\n' if thinking else '<|assistant|>\\n<think>\\n\\n</think>\\n' }}"
    "{%- endif -%}"
)


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"messages[{i}]: 'content' must be a string, a list of parts or None")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append(part["text"])
        elif kind in ("image", "image_url"):
            out.append("<image>")
        else:
            raise ValueError(f"messages[{i}]: content part type {kind} is not text or image")
    return "".join(out)


def _tool_calls(message: dict, has_text: bool) -> str:
    calls = [json.dumps(c.get("function", c), ensure_ascii=False) for c in message.get("tool_calls") or []]
    return ("\n" if has_text and calls else "") + "\n".join(calls)


def _check(message: dict, i: int) -> None:
    if message.get("role") not in ROLES:
        raise ValueError(f"messages[{i}]: role {message.get('role')!r} is not one of {ROLES}")


def think_block(reasoning: str) -> str:
    return THINK_OPEN + reasoning + THINK_CLOSE


def render_chat(messages: list[dict], thinking: bool = True, add_generation_prompt: bool = False,
                tools: list[dict] | None = None) -> str:
    """The conversation as text (tokenize it with the project tokenizer); see the module docstring and
    the comment above ``CHAT_TEMPLATE`` for content parts, tool calls and ``tools``."""
    out = []
    tool_text = (TOOLS_HEADER + "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools)) if tools else ""
    if tool_text and (not messages or messages[0].get("role") != "system"):
        out.append("<|system|>\n" + tool_text.rstrip("\n") + END + "\n")
    for i, m in enumerate(messages):
        _check(m, i)
        out.append(f"<|{m['role']}|>\n")
        if m["role"] == "assistant":
            out.append(think_block((m.get("thinking") or "") if thinking else ""))
        text = _content(m, i)
        out.append(text + _tool_calls(m, bool(text)))
        if i == 0 and m["role"] == "system" and tool_text:
            out.append(("\n\n" if text else "") + tool_text.rstrip("\n"))
        out.append(END + "\n")
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
