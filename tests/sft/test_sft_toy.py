"""A tiny SFT run on CPU teaches the reverse task's format: greedy generation thinks, closes the think
block, answers and ends the turn; non-thinking prompts answer directly."""
import os

import pytest
from distributed import run_distributed
from sft_common import get_render, stand_in_render, write_jsonl
from sft_workers import train_sft

from megatron_bluelm.config.data import BUNDLED_TOKENIZER
from megatron_bluelm.data.sft import ChatOptions, preprocess_chat, toy_reverse_conversations
from megatron_bluelm.data.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _prompt(render, words, thinking):
    msgs = [{"role": "user", "content": "reverse: " + " ".join(words)}]
    if render is stand_in_render:
        return render(msgs, thinking=thinking, add_generation_prompt=True)
    from megatron_bluelm.inference.engine import render_prompt

    return render_prompt(msgs, thinking)


@pytest.mark.slow
def test_tiny_sft_learns_the_format(tmp_path):
    render = get_render()
    data = write_jsonl(tmp_path / "chats.jsonl", toy_reverse_conversations(3000, seed=0))
    preprocess_chat(ChatOptions([data], str(tmp_path / "sft"), BUNDLED_TOKENIZER, think_ratio=0.6), render=render)
    overrides = ["--data.prefix", str(tmp_path / "sft_text_document"), "--checkpoint.save", "none",
                 "--logging.output_dir", str(tmp_path / "run"), "--model.backend", "torch",
                 # 80 steps of one micro-batch of 16: the loss falls to ~5% of its start and every prompt
                 # gets the format (150 steps of 4 x 4 also get the answers right, in 2.5x the time)
                 "--training.train_steps", "80", "--training.micro_batch_size", "16"]
    tests = [["cat", "sun", "tree"], ["blue", "dog"], ["moon", "fish", "red", "star"]]
    prompts = [_prompt(render, w, True) for w in tests] + [_prompt(render, w, False) for w in tests]
    losses, outs = run_distributed(train_sft, 1, os.path.join(ROOT, "examples/sft_tiny.yaml"), overrides,
                                   None, prompts)[0]
    assert losses[-1] < 0.35 * losses[0], losses
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    end, close = tok.special_ids["<|end|>"], tok.special_ids["</think>"]
    correct = 0
    for i, (words, toks) in enumerate(zip(tests + tests, outs)):
        text = tok.decode(toks)
        assert toks[-1] == end, f"turn not ended: {text!r}"
        if i < len(tests):  # thinking prompt: reasoning, then </think>, then the answer
            assert close in toks and toks.index(close) > 0, text
        else:  # non-thinking prompt: the think block is already closed, no second one
            assert close not in toks, text
        correct += text.split("</think>")[-1].strip().startswith(" ".join(reversed(words)))
    print(f"exact answers: {correct}/{len(outs)}")
