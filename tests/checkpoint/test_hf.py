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
