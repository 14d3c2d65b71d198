"""The reward-model stage learns a toy preference (Bradley-Terry, from a pretrain checkpoint, PP2) and
the RL stage scores rollouts with it; the score reads the answer only."""
import pytest
from distributed import run_distributed
from rl_workers import reward_model_story


def test_scores_the_answer_only():
    from megatron_bluelm.config.schema import RunConfig
    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.rl.reward_model import score_tokens

    tok = load_tokenizer(RunConfig().data.tokenizer_model)
    rec = {"messages": [{"role": "user", "content": "2+2?"}]}
    a = score_tokens(tok, rec, "long reasoning here\n</think>\n4", 64)
    b = score_tokens(tok, rec, "other thoughts\n</think>\n4", 64)
    assert a == b and a[-1] == tok.special_ids["<|end|>"]
    assert score_tokens(tok, rec, "x</think>5", 64) != a


def test_reward_model_learns_and_feeds_rl(tmp_path):
    out = run_distributed(reward_model_story, 2, str(tmp_path), ["--parallel.pp", "2"], timeout=900)
    for r in out:  # every rank of the pipeline sees the same evaluation and rewards
        assert r["rm_eval"] == out[-1]["rm_eval"] and r["rl"][0]["reward"] == out[-1]["rl"][0]["reward"]
    first, last = out[-1]["rm_eval"][0], out[-1]["rm_eval"][-1]
    assert last["step"] == 12 and last["pair_accuracy"] >= 0.9 > first["pair_accuracy"], out[-1]["rm_eval"]
    step = out[-1]["rl"][0]
    assert step["reward/model"] == pytest.approx(step["reward"])  # the only reward: the model's score
