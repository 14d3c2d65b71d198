"""Rule-based verifiers: extraction, normalization, malformed outputs, hybrid weighting."""
import pytest

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.rl.rewards import REGISTRY, HybridReward, last_boxed, math_equal


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{a, b\\}}", "\\{a, b\\}"),  # escaped braces balance too
    ("\\boxed{x", None),
    ("no box", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("pred,ref", [
    ("\\frac{1}{2}", "0.5"), ("1,000", "1000"), ("\\text{7}", "7"), ("$3$.", "3"), (" 2/4 ", "1/2"),
    ("\\dfrac{6}{3}", "2"), ("-0.25", "-\\frac{1}{4}"),
])
def test_math_equal_normalizes(pred, ref):
    assert math_equal(pred, ref)


@pytest.mark.parametrize("pred,ref", [("3", "4"), ("1/0", "0"), ("x+1", "x+2"), ("", "0")])
def test_math_not_equal(pred, ref):
    assert not math_equal(pred, ref)


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


def test_format_reward():
    f = REGISTRY["format"]
    assert f("<think>a</think>b", {}) == 1.0
    assert f("<think>a</think>  ", {}) == 0.0  # empty answer
    assert f("x<think>a</think>b", {}) == 0.0  # text before the think block
    assert f("<think>a</think>b</think>", {}) == 0.0
    assert f("b", {}) == 0.0


def test_length_penalty():
    f = REGISTRY["length_penalty"]
    assert f("", {"thinking_budget": 10, "thinking_tokens": 10}) == 0.0
    assert f("", {"thinking_budget": 10, "thinking_tokens": 15}) == pytest.approx(-0.5)
    assert f("", {"thinking_budget": 10, "thinking_tokens": 40}) == -1.0
    assert f("", {"thinking_tokens": 40}) == 0.0


def test_hybrid_weights_per_source_and_model_hook():
    calls = []

    def judge(responses, samples):
        calls.append(len(responses))
        return [0.5] * len(responses)

    h = HybridReward(weights={"math": {"math_boxed": 1.0, "format": 0.2}, "chat": {"model": 2.0}},
                     default={"exact_match": 1.0}, model_reward=judge)
    out = h(["<think>t</think>\\boxed{2}", "hello", "yes"],
            [{"source": "math", "answer": "2"}, {"source": "chat", "answer": ""}, {"source": "other", "answer": "Yes"}])
    assert out[0]["reward"] == pytest.approx(1.2) and out[0]["format"] == 1.0
    assert out[1]["reward"] == pytest.approx(1.0) and calls == [3]  # model reward called once, batched
    assert out[2]["reward"] == 1.0


def test_hybrid_unknown_reward_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown reward 'bleu'"):
        HybridReward(default={"bleu": 1.0})
    with pytest.raises(ConfigError, match="needs a model_reward hook"):
        HybridReward(default={"model": 1.0})
