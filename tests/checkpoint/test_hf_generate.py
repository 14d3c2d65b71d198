"""Greedy generation is token-identical to HF transformers' greedy generate on the exported model
(fp32), batched prompts of different lengths included, and to itself under TP2."""
import os

import pytest
import torch
from ckpt_workers import greedy_generate
from distributed import run_distributed

from megatron_bluelm.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

PROMPTS = ["The Python interpreter", "def main(", "A list is a mutable sequence of"]
NEW = 12


def test_greedy_matches_hf_generate_and_tp2(exported):
    save, hf_dir = exported
    tok = load_tokenizer()
    ours = run_distributed(greedy_generate, 1, save, PROMPTS, NEW)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for prompt, got in zip(PROMPTS, ours):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                                 min_new_tokens=NEW, eos_token_id=None, pad_token_id=tok.pad)
        assert got == out[0, ids.shape[1]:].tolist(), prompt
    # batched, as a user calls it: the exported tokenizer pads (on the left) and the generation config's
    # pad id is the tokenizer's
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    enc = hf_tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=NEW, eos_token_id=None)  # ours: no stop
    assert [row[enc["input_ids"].shape[1]:].tolist() for row in out] == ours
    tp2 = run_distributed(greedy_generate, 2, save, PROMPTS, NEW, 2)
    assert tp2[0] == ours and tp2[1] == ours
