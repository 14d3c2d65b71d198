"""SFT preprocessing (loss mask, thinking mix, budget-aware samples) and packing."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from sft_common import get_render, stand_in_render, write_jsonl

from megatron_bluelm.config.data import BUNDLED_TOKENIZER
from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.sft import (
    DEFAULT_BRIDGE,
    ChatOptions,
    assistant_loss_mask,
    preprocess_chat,
    toy_reverse_conversations,
)
from megatron_bluelm.data.sft_packing import build_row, pack_rows
from megatron_bluelm.data.tokenizer import load_tokenizer

TOK = load_tokenizer(BUNDLED_TOKENIZER)
A, E = TOK.special_ids["<|assistant|>"], TOK.special_ids["<|end|>"]


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    text, mask = IndexedDataset(prefix + "_text_document"), IndexedDataset(prefix + "_loss_mask_document")
    # copies: the arrays are views of the datasets' mmaps, closed when the datasets are collected
    return [(np.array(text[i]), np.array(mask[i])) for i in range(len(text))]


def test_loss_mask_covers_assistant_turns_only():
    toks = np.array([9, 1, 2, A, 5, 6, E, 10, 7, A, 8, E, 3])
    assert assistant_loss_mask(toks, A, E).tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0]


def test_preprocess_masks_and_mixes(tmp_path):
    records = toy_reverse_conversations(200, seed=1)
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    opts = ChatOptions([path], str(tmp_path / "sft"), BUNDLED_TOKENIZER, think_ratio=0.5, seed=7)
    counts = preprocess_chat(opts, render=get_render())
    assert counts["samples"] == 200 and 70 <= counts["thinking"] <= 130
    samples = _read(str(tmp_path / "sft"))
    for (tokens, mask), rec in zip(samples, records):
        assert len(tokens) == len(mask)
        learned = TOK.decode(tokens[mask == 1].tolist())
        answer = rec["messages"][1]["content"]
        assert answer in learned and "reverse:" not in learned  # user text never in the loss
        assert tokens[mask == 1][-1] == E
    thinking = sum("last first" in TOK.decode(t.tolist()) for t, _ in samples)
    assert thinking == counts["thinking"]
    again = ChatOptions([path], str(tmp_path / "sft2"), BUNDLED_TOKENIZER, think_ratio=0.5, seed=7)
    assert preprocess_chat(again, render=get_render()) == counts  # seeded


def test_budget_aware_samples_cut_thinking_and_add_bridge(tmp_path):
    rec = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "thinking": "one two three four five six seven", "content": "ans"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [rec] * 20)
    opts = ChatOptions([path], str(tmp_path / "b"), BUNDLED_TOKENIZER, budget_ratio=1.0, seed=0)
    preprocess_chat(opts, render=stand_in_render)
    for tokens, _ in _read(str(tmp_path / "b")):
        text = TOK.decode(tokens.tolist())
        assert "seven" not in text and DEFAULT_BRIDGE.strip() in text
        assert text.index("</think>") < text.index(DEFAULT_BRIDGE.strip()) < text.index("ans")


def test_bad_input_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1: .*no assistant"):
        preprocess_chat(ChatOptions([str(path)], str(tmp_path / "o"), BUNDLED_TOKENIZER), render=stand_in_render)


def test_packing_boundaries():
    rows = pack_rows(np.array([5, 4, 3, 9]), np.array([0, 1, 2, 3]), 10)
    assert rows == [[0, 1], [2], [3]]
    s1 = (np.array([11, 12, 13, 14]), np.array([0, 1, 1, 1]))
    s2 = (np.array([21, 22, 23]), np.array([0, 1, 1]))
    row = build_row([s1, s2], seq_length=9, pad_id=0)
    assert row["tokens"].tolist() == [11, 12, 13, 14, 21, 22, 23, 0, 0]
    assert row["position_ids"].tolist()[:7] == [0, 1, 2, 3, 0, 1, 2]
    # label of position 3 is sample 2's first token: never learned; padding never learned
    assert row["loss_mask"].tolist() == [1, 1, 1, 0, 1, 1, 0, 0, 0]
    assert row["document_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2] and "attention_mask" not in row


def test_cli_chat_mode(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", toy_reverse_conversations(5))
    if get_render() is stand_in_render:
        pytest.skip("megatron_bluelm/data/chat_template.py does not exist yet (the CLI renders with it)")
    r = subprocess.run([sys.executable, "tools/preprocess_data.py", "--chat", "--input", path, "--output-prefix",
                        str(tmp_path / "cli"), "--tokenizer-model", BUNDLED_TOKENIZER], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(_read(str(tmp_path / "cli"))) == 5


def test_packed_row_trains_like_separate_samples():
    """Per-token losses of a packed row equal those of each sample alone (positions + mask reset)."""
    from distributed import run_distributed

    got = run_distributed(_packed_vs_alone, 1)[0]
    torch.testing.assert_close(got["packed"], got["alone"], rtol=1e-5, atol=1e-5)


def _packed_vs_alone():
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.inference.model import build_inference_model

    cfg = load_config(None, ["--data.seq_length", "32", "--model.backend", "torch",
                             "--data.reset_position_ids", "true"])
    model = build_inference_model(cfg, 8192).model
    samples = [(np.arange(30, 40), np.ones(10)), (np.arange(50, 57), np.ones(7))]
    row = build_row(samples, 32, 0)
    with torch.no_grad():
        packed = model(row["tokens"][None], row["position_ids"][None], row["document_ids"][None],
                       labels=row["labels"][None])[0]
        alone = [model(torch.tensor(t[:-1])[None], torch.arange(len(t) - 1)[None], None,
                       labels=torch.tensor(t[1:])[None])[0] for t, _ in samples]
    keep = row["loss_mask"] > 0
    return {"packed": packed[keep], "alone": torch.cat(alone)}
