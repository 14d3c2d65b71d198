"""The chat template for SFT tests: the project's ``render_chat`` once it exists, else a stand-in of
the same shape (roles as <|role|> turns ended by <|end|>, the answer opened by a think block)."""
import importlib.util
import json


def stand_in_render(messages, thinking, add_generation_prompt=False):
    out = ""
    for m in messages:
        out += f"<|{m['role']}|>\n"
        if m["role"] == "assistant":
            out += "<think>" + (m.get("thinking", "") if thinking else "") + "</think>"
        out += m["content"] + "<|end|>\n"
    if add_generation_prompt:
        out += "<|assistant|>\n" + ("<think>" if thinking else "<think></think>")
    return out


def get_render():
    if importlib.util.find_spec("megatron_bluelm.data.chat_template") is not None:
        from megatron_bluelm.data.chat_template import render_chat

        return render_chat
    return stand_in_render


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)
