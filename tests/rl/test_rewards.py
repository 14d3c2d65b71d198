"""Rule-based verifiers: extraction, normalization, malformed outputs, hybrid weighting."""
import pytest

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.rl.rewards import REGISTRY, HybridReward


# The math verifier is the evaluation's grader (eval/graders.py, its own table test): these rows
# are the tricky answers, checked through the RL reward.
@pytest.mark.parametrize("pred,ref,ok", [
    ("\\frac12", "0.5", True), ("\\sqrt3", "\\sqrt{3}", True), ("x=3", "3", True), ("5 cm", "5", True),
    ("10^{3}", "1000", True), ("\\$5", "5", True), ("\\{2, 1\\}", "\\{1, 2\\}", True), ("50\\%", "0.5", True),
    ("1_000", "1000", False), ("{1}{2}", "12", False), ("3", "4", False),
])
def test_math_verifier_table(pred, ref, ok):
    assert REGISTRY["math_boxed"](f"t</think>so \\boxed{{{pred}}}", {"answer": ref}) == float(ok)


def test_fbox_and_choice_verifiers():
    assert REGISTRY["math_boxed"]("t</think>\\fbox{7}", {"answer": "7"}) == 1.0
    assert REGISTRY["multiple_choice"]("t</think>The answer is (B).", {"answer": "B"}) == 1.0


def test_math_boxed_reads_the_answer_after_thinking():
    f = REGISTRY["math_boxed"]
    assert f("<think>maybe \\boxed{5}</think> the answer is \\boxed{6}", {"answer": "6"}) == 1.0
    assert f("<think>\\boxed{6}</think> no box here", {"answer": "6"}) == 0.0


@pytest.mark.parametrize("garbage", ["", "}}}{{{", "\\boxed{", "<think></think></think>", "\x00\ufffd",
                                     "\\boxed{}" * 50])
def test_malformed_outputs_never_raise(garbage):
    sample = {"answer": "1", "thinking_budget": 4, "thinking_tokens": 9}
    for name, fn in REGISTRY.items():
        score = fn(garbage, sample)
        assert isinstance(score, float), name


def test_format_reward_follows_our_template():
    """The thinking prompt ends with ``<think>\\n`` (data/chat_template.py): a well-formed rollout is
    "thought</think>answer"; opening a second <think> is malformed."""
    from megatron_bluelm.data.chat_template import render_chat

    prompt = render_chat([{"role": "user", "content": "q"}], thinking=True, add_generation_prompt=True)
    assert prompt.endswith("<think>\n")  # what the response continues from
    f = REGISTRY["format"]
    thinking = {"thinking_budget": 16}
    assert f("reasoning\n</think>\nthe answer", thinking) == 1.0
    assert f("<think>a</think>b", thinking) == 0.0  # a second think block
    assert f("reasoning\n</think>\n  ", thinking) == 0.0  # empty answer
    assert f("a</think>b</think>", thinking) == 0.0
    assert f("no close at all", thinking) == 0.0
    non_thinking = {"thinking_budget": 0}  # the prompt holds an empty think block already
    assert f("the answer", non_thinking) == 1.0
    assert f("x</think>y", non_thinking) == 0.0


def test_length_penalty_fires_on_the_forced_close():
    """Generation never lets thinking pass the budget, so "over budget" is the forced close."""
    f = REGISTRY["length_penalty"]
    assert f("", {"thinking_budget": 10, "thinking_tokens": 10, "forced_close": True}) == -1.0
    assert f("", {"thinking_budget": 10, "thinking_tokens": 6}) == 0.0
    ramp = {"thinking_budget": 10, "budget_buffer": 4}
    assert f("", {**ramp, "thinking_tokens": 6}) == 0.0
    assert f("", {**ramp, "thinking_tokens": 8}) == pytest.approx(-0.5)
    assert f("", {"thinking_tokens": 40}) == 0.0  # no budget


def test_overlong_soft_punishment():
    f = REGISTRY["overlong"]
    s = {"max_new_tokens": 20, "overlong_buffer": 4}
    assert f("", {**s, "response_tokens": 16}) == 0.0
    assert f("", {**s, "response_tokens": 18}) == pytest.approx(-0.5)
    assert f("", {**s, "response_tokens": 20, "finish_reason": "length"}) == -1.0


def test_components_fixed_and_complete_for_mixed_sources():
    """Every sample reports every component (NaN where its source does not use it), in one sorted
    order that does not depend on which sources came first: DP ranks reduce the same vector."""
    import math

    h = HybridReward(weights={"math": {"math_boxed": 1.0, "format": 0.2}}, default={"exact_match": 1.0})
    assert h.components == ["exact_match", "format", "math_boxed"]
    out = h(["7", "t</think>\\boxed{2}"], [{"source": "chat", "answer": "7"},
                                           {"source": "math", "answer": "2", "thinking_budget": 8}])
    assert [sorted(o) for o in out] == [["exact_match", "format", "math_boxed", "reward"]] * 2
    assert out[0]["exact_match"] == 1.0 and math.isnan(out[0]["math_boxed"])
    assert out[1]["reward"] == pytest.approx(1.2) and math.isnan(out[1]["exact_match"])


def test_hybrid_weights_per_source_and_model_hook():
    calls = []

    def judge(responses, samples):
        calls.append(len(responses))
        return [0.5] * len(responses)

    h = HybridReward(weights={"math": {"math_boxed": 1.0, "format": 0.2}, "chat": {"model": 2.0}},
                     default={"exact_match": 1.0}, model_reward=judge)
    out = h(["t</think>\\boxed{2}", "hello", "yes"],
            [{"source": "math", "answer": "2"}, {"source": "chat", "answer": ""}, {"source": "other", "answer": "Yes"}])
    assert out[0]["reward"] == pytest.approx(1.2) and out[0]["format"] == 1.0
    assert out[1]["reward"] == pytest.approx(1.0) and calls == [1]  # once, batched, only where a source uses it
    assert out[2]["reward"] == 1.0


def test_hybrid_unknown_reward_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown reward 'bleu'"):
        HybridReward(default={"bleu": 1.0})
    with pytest.raises(ConfigError, match="needs a reward model"):
        HybridReward(default={"model": 1.0})
