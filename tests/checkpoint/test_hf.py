"""Hugging Face export: transformers loads it offline and computes our logits; tokenizer and chat
template match ours; HF -> megatron -> HF is bit-identical."""
import json
import os

import pytest
import torch
from ckpt_workers import convert, megatron_logits
from distributed import run_distributed

from megatron_bluelm.data.chat_template import render_chat
from megatron_bluelm.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "thinking": "Add them: 4.", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


def test_hf_logits_equal_ours(exported):
    save, hf_dir = exported
    tok = load_tokenizer()
    ids = tok.encode(render_chat(CHAT, thinking=True, add_generation_prompt=True))
    ours = run_distributed(megatron_logits, 1, save, ids)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    assert theirs.shape == (len(ids), tok.vocab_size)
    torch.testing.assert_close(theirs, ours[:, : tok.vocab_size], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("thinking", [True, False])
def test_hf_tokenizer_and_chat_template_match(exported, thinking):
    _, hf_dir = exported
    ours = load_tokenizer()
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = render_chat(CHAT, thinking=thinking, add_generation_prompt=True)
    assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True, enable_thinking=thinking) == text
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    for sample in ["Hello world", " leading space", "x <|end|> y\n  z", "def f(x):\n    return x**2",
                   "<image><img_start>tile<img_end>", "Ünïcödé 🙂 \t tabs", "literal <s> and </s>"]:
        assert hf.encode(sample, add_special_tokens=False) == ours.encode(sample), sample
        assert hf.decode(ours.encode(sample)) == ours.decode(ours.encode(sample))
    gen = json.load(open(os.path.join(hf_dir, "generation_config.json")))
    assert ours.special_ids["<|end|>"] in gen["eos_token_id"]


def test_render_chat_non_thinking_has_empty_think_block():
    text = render_chat(CHAT[:3], thinking=False)
    assert "<|assistant|>\n<think>\n\n</think>\n4<|end|>\n" in text
    assert render_chat(CHAT[:3], thinking=True).endswith("<|assistant|>\n<think>\nAdd them: 4.\n</think>\n4<|end|>\n")
    assert render_chat(CHAT[:2], add_generation_prompt=True).endswith("<|assistant|>\n<think>\n")


def test_hf_to_megatron_to_hf_is_bit_identical(exported, tmp_path):
    from safetensors.torch import load_file

    _, hf_dir = exported
    run_distributed(convert, 1, "from_hf", hf_dir, str(tmp_path / "mcore"))
    run_distributed(convert, 1, "to_hf", str(tmp_path / "mcore"), str(tmp_path / "hf2"))
    a, b = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert open(os.path.join(hf_dir, f), "rb").read() == open(tmp_path / "hf2" / f, "rb").read(), f


# ---- what a Hugging Face user meets: decode, ids, padding, templates, refused imports, versions ----

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]
TEMPLATE_CASES = {
    "list-content": ([{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "image"},
                                                    {"type": "text", "text": " this?"}]}], None),
    "tool-call-content-none": ([
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5 — é"}], TOOLS),
    "tools-with-system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], TOOLS),
    "text-and-two-calls": ([{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "calling", "tool_calls": [
        {"function": {"name": "a", "arguments": "{}"}}, {"function": {"name": "b", "arguments": {}}}]}],
        None),
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_CASES))
def test_chat_template_list_content_tool_calls_and_tools(exported, case):
    _, hf_dir = exported
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    messages, tools = TEMPLATE_CASES[case]
    for thinking in (True, False):
        text = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                      enable_thinking=thinking)
        assert text == render_chat(messages, thinking=thinking, add_generation_prompt=True, tools=tools)
    if case == "list-content":
        assert "<|user|>\nWhat is <image> this?<|end|>" in text
    if tools:
        assert '"name": "add"' in text.split("<|end|>")[0] and text.startswith("<|system|>\n")
    if case == "tool-call-content-none":
        assert '</think>\n{"name": "add", "arguments": {"a": 2, "b": 3}}<|end|>' in text


def test_chat_template_unknown_role_is_an_error(exported):
    _, hf_dir = exported
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    with pytest.raises(Exception, match="messages\\[1\\]: role robot is not one of"):
        hf.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], tokenize=False)
    with pytest.raises(ValueError, match="messages\\[1\\]: role 'robot'"):
        render_chat([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}])


def test_skip_special_tokens_keeps_the_reasoning_boundary(exported):
    _, hf_dir = exported
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = load_tokenizer().encode("<|assistant|>\n<think>\nadd them\n</think>\n4<|end|>")
    assert hf.decode(ids, skip_special_tokens=True) == "\n<think>\nadd them\n</think>\n4"


def test_pad_bos_and_padding_side_agree_across_files(exported):
    _, hf_dir = exported
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    gen = json.load(open(os.path.join(hf_dir, "generation_config.json")))
    assert hf.pad_token_id == config["pad_token_id"] == gen["pad_token_id"] == load_tokenizer().special_ids["<|end|>"]
    assert hf.bos_token_id is None and config["bos_token_id"] is None and gen["bos_token_id"] is None
    assert hf.eos_token_id in config["eos_token_id"] and config["eos_token_id"] == gen["eos_token_id"]
    assert hf.padding_side == "left"


REFUSED = {
    "llama3-rope": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
                    "rope_scaling: rope_type 'llama3'"),
    "yarn-rope": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
                  "rope_parameters: rope_type 'yarn'"),
    "gelu": ({"hidden_act": "gelu"}, "hidden_act: 'gelu'"),
}


def _changed_copy(hf_dir, dest, change):
    import shutil

    shutil.copytree(hf_dir, dest)
    config = json.load(open(dest / "config.json"))
    config.update(change)
    json.dump(config, open(dest / "config.json", "w"))
    return dest


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_hf_to_mcore_refuses_what_it_cannot_represent(exported, tmp_path, case):
    from megatron_bluelm.convert.api import hf_to_megatron
    from megatron_bluelm.convert.mapping import ConversionError

    change, needle = REFUSED[case]
    src = _changed_copy(exported[1], tmp_path / "hf", change)
    with pytest.raises(ConversionError, match="not convertible: " + needle.replace("(", r"\(")):
        hf_to_megatron(str(src), str(tmp_path / "out"))  # refused before any process group or model
    assert not (tmp_path / "out").exists()


def test_hf_to_mcore_refusal_exits_2_on_the_command_line(exported, tmp_path):
    import subprocess
    import sys

    src = _changed_copy(exported[1], tmp_path / "hf", REFUSED["llama3-rope"][0])
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "hf-to-mcore", "--hf",
                        str(src), "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "rope_type 'llama3'" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


OLDEST = os.environ.get("BLUELM_TRANSFORMERS_OLDEST", os.path.join(REPO, ".deps", "transformers-oldest"))


def test_export_loads_in_the_oldest_declared_transformers(exported, tmp_path):
    """The text export on the oldest transformers setup.py declares (`make install` puts it in
    .deps/transformers-oldest): same tokenizer ids, chat template and logits as ours."""
    import subprocess
    import sys

    if not os.path.isdir(OLDEST):
        pytest.skip(f"no oldest transformers at {OLDEST} (make install puts it there)")
    _, hf_dir = exported
    tok = load_tokenizer()
    text = render_chat(CHAT, thinking=True, add_generation_prompt=True)
    code = (
        "import json, sys, torch, transformers\n"
        f"hf_dir, text = {hf_dir!r}, {text!r}\n"
        "tok = transformers.AutoTokenizer.from_pretrained(hf_dir)\n"
        f"chat = tok.apply_chat_template({CHAT!r}, tokenize=False, add_generation_prompt=True)\n"
        "ids = tok.encode(text, add_special_tokens=False)\n"
        "model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()\n"
        "with torch.no_grad():\n"
        "    logits = model(torch.tensor([ids])).logits[0]\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
        "print(json.dumps({'version': transformers.__version__, 'ids': ids, 'chat': chat}))\n")
    env = dict(os.environ, PYTHONPATH=OLDEST)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    declared = open(os.path.join(REPO, "setup.py")).read()
    assert f'"transformers>={got["version"]}' in declared, (got["version"], "is not setup.py's oldest version")
    assert got["ids"] == tok.encode(text) and got["chat"] == text
    # the newest transformers computes our logits (test_hf_logits_equal_ours); the oldest must match it
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        newest = model(torch.tensor([got["ids"]])).logits[0]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), newest, rtol=1e-5, atol=1e-5)
