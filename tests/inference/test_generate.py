"""The generation engine on the random tiny model (1 rank, fp32): against megatron-core's forward with
its static cache (``reference.py``) and a full no-cache forward; continuous batching, per-row limits,
shared prefill, the thinking budget, log-probs, seeds."""
import math

import pytest
from distributed import run_distributed
from gen_workers import CLOSE, END_THINK, MANY, MANY_MAX_NEW, THINK, generation_checks, model_overrides


@pytest.fixture(scope="module")
def res():
    return run_distributed(generation_checks, 1, model_overrides(precision="fp32"))[0]


def test_greedy_equals_reference_and_full_forward(res):
    assert res["single"] == res["full_forward"]
    assert res["batched"] == res["reference"] == res["full_forward"]
    assert all(len(t) == 10 for t in res["batched"])


def test_decode_stops_at_the_token_limit(res):
    # 10 new tokens take 10 decode steps (a burst of check_every=8, then one of the 2 left), not two
    # full bursts: the host knows every row's limit
    assert res["steps_for_10"] == 10


def test_stop_token_ends_the_sample(res):
    out = res["stopped"]
    assert out.finish_reason == "stop" and out.tokens == res["single"][0][:4]


def test_continuous_batching_equals_each_prompt_alone(res):
    assert [o.tokens for o in res["cb"]] == [o.tokens for o in res["cb_alone"]]
    assert [len(o.tokens) for o in res["cb"]] == MANY_MAX_NEW
    assert all(o.finish_reason == "length" for o in res["cb"])


def test_continuous_batching_refills_slots(res):
    assert res["cb_slots"] == 2
    stats = res["cb_stats"]
    # every prompt (minus its last token, the first decode input) went through a 2-slot cache
    assert stats["prefill_tokens"] == sum(len(p) - 1 for p in MANY)
    assert stats["row_steps"] <= 2 * stats["decode_steps"]
    assert sorted(res["cb_finish_order"]) == list(range(len(MANY)))  # on_finish once per sample


def test_per_row_context_limit(res):
    short0, long, short1 = res["rows"]
    assert long.finish_reason == "context" and len(long.tokens) == 3
    assert long.tokens == res["context_full"].tokens
    assert short0.finish_reason == short1.finish_reason == "length"
    assert [short0.tokens, short1.tokens] == [res["single"][0], res["single"][1]]


def test_group_shares_one_prefill(res):
    assert res["group_prefill"] == res["group_prompt_len"] - 1
    toks = [tuple(o.tokens) for o in res["group"]]
    assert len(set(toks)) == len(toks), "the G samples of one prompt must draw different tokens"


def _check_budget(out, budget, close):
    toks, forced = out.tokens, out.forced
    assert len(forced) == len(toks) == len(out.logprobs)
    if budget is None:
        assert not any(forced) and not out.forced_close
        closed_at = toks.index(END_THINK) if END_THINK in toks else len(toks)
        assert THINK not in toks[:closed_at]
        after = toks[closed_at + 1:]
    else:
        assert out.thinking_tokens == budget and out.forced_close
        assert toks[budget:budget + len(close)] == close
        assert forced == [False] * budget + [True] * len(close) + [False] * (len(toks) - budget - len(close))
        assert all(out.logprobs[j] == 0.0 for j in range(budget, budget + len(close)))
        assert END_THINK not in toks[:budget] and THINK not in toks[:budget]
        after = toks[budget + len(close):]
        assert after, "no answer after the forced close"
    assert THINK not in after and END_THINK not in after


@pytest.mark.parametrize("key", ["budget_greedy", "budget_hot"])
def test_budget_obeyed_for_every_row(res, key):
    for out, budget in zip(res[key], res["budgets"]):
        _check_budget(out, budget, CLOSE)


@pytest.mark.parametrize("key", ["budget_greedy", "budget_hot"])
def test_unlimited_row_counts_every_thinking_token(res, key):
    out = res[key][res["budgets"].index(None)]
    closed_at = out.tokens.index(END_THINK) if END_THINK in out.tokens else len(out.tokens)
    assert out.thinking_tokens == closed_at


def test_budget_zero_starts_with_the_close(res):
    assert res["budget_greedy"][0].tokens[:len(CLOSE)] == CLOSE
    assert res["budget_greedy"][0].thinking_tokens == 0


def test_bridge_follows_end_think_without_close_ids(res):
    for out in res["bridge"]:
        assert out.tokens[2:5] == [END_THINK, 77, 78] and out.forced[2:5] == [True] * 3


def test_budget_clamped_with_a_warning(res):
    out = res["clamped"]  # max_new 6, close of 4: budget 8 -> 2
    assert out.thinking_tokens == 2 and out.tokens[2:6] == CLOSE and len(out.tokens) == 6
    assert out.warnings and "thinking_budget 8 clamped to 2" in out.warnings[0]
    ctx = res["clamped_ctx"]  # 6 positions left by the context: budget 20 -> 2
    assert ctx.finish_reason == "context" and ctx.thinking_tokens == 2 and ctx.tokens[2:6] == CLOSE
    assert ctx.warnings and "the context" in ctx.warnings[0]
    assert not res["budget_greedy"][1].warnings


def test_budget_counts_generated_thinking_tokens_only(res):
    b5, off, unlimited, b2 = res["text_outs"]
    close = res["text_close"]
    # the thinking prompt ends "<think>" "\n": that newline is the template's, not the model's
    think_end, plain_end = res["text_prompt_ends"]
    assert think_end[0] == "<think>" and think_end[1] != "<think>" and plain_end[-1] != "<think>"
    assert b5.thinking_tokens == 5 and b5.tokens[5:5 + len(close)] == close
    assert b2.thinking_tokens == 2 and b2.tokens[2:2 + len(close)] == close
    assert [i for i, f in enumerate(b5.forced) if f] == list(range(5, 5 + len(close)))
    assert off.thinking_tokens == 0 and not any(off.forced)
    assert THINK not in off.tokens and END_THINK not in off.tokens
    assert not any(unlimited.forced)


@pytest.mark.parametrize("name", ["t1.5", "greedy", "topk"])
def test_logprobs_equal_full_forward(res, name):
    for got, expected, in_top_k in res["logprobs"][name]:
        assert len(got) == len(expected) == 8
        assert all(math.isfinite(g) for g in got)
        assert max(abs(g - e) for g, e in zip(got, expected)) < 1e-4, (got, expected)
        if name == "topk":
            assert all(in_top_k)


def test_seeds_reproducible_and_independent_of_batch_mates(res):
    a = [o.tokens for o in res["seed_a"]]
    assert a == [o.tokens for o in res["seed_a_again"]]
    assert res["seed_b"][2].tokens == a[2]  # same seed, same index, other batch-mates
    assert [o.tokens for o in res["seed_one_slot"]] == a  # other slots, other refill order
    assert [o.tokens for o in res["seed_other"]] != a


def test_errors_name_the_setting(res):
    e = res["errors"]
    assert "context is 96" in e["too_long"] and "data.seq_length" in e["too_long"]
    assert "thinking_budget" in e["negative_budget"]
    assert "empty" in e["empty"]
    assert "max_new_tokens" in e["max_new_count"]
    assert "close_ids" in e["close_without_end"]
