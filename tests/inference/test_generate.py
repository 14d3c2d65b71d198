"""Generation on our megatron model with megatron-core's KV cache (random tiny model, 1 rank)."""
import pytest
from distributed import run_distributed
from gen_workers import END_THINK, generation_checks, model_overrides


@pytest.fixture(scope="module")
def res():
    return run_distributed(generation_checks, 1, model_overrides())[0]


def test_cached_generation_equals_full_forward(res):
    assert res["single"] == res["reference"]


def test_batched_equals_unbatched(res):
    assert res["batched"] == res["single"]
    assert len({len(t) for t in res["batched"]}) == 1 and len(res["batched"][0]) == 10


def test_stop_token_ends_the_sample(res):
    out = res["stopped"]
    assert out.finish_reason == "stop" and out.tokens == res["single"][0][:4]


@pytest.mark.parametrize("key", ["budget_greedy", "budget_sampled"])
def test_budget_obeyed_for_every_sample(res, key):
    for out, budget in zip(res[key], res["budgets"]):
        toks = out.tokens
        assert END_THINK in toks, f"budget {budget}: think block never closed: {toks}"
        closed_at = toks.index(END_THINK)
        assert closed_at <= budget and out.thinking_tokens == closed_at
        assert len(toks) > closed_at + 1, "no answer after </think>"
    # random weights never close by themselves: each close is the forced one, exactly at the budget
    assert [o.tokens.index(END_THINK) for o in res[key]] == res["budgets"]
    assert all(o.forced_close for o in res[key])


def test_budget_zero_is_an_empty_think_block(res):
    assert res["budget_greedy"][0].tokens[0] == END_THINK


def test_bridge_follows_forced_close(res):
    for out in res["budget_greedy"]:
        i = out.tokens.index(END_THINK)
        assert out.tokens[i + 1:i + 3] == [77, 78]


def test_sampling_is_reproducible(res):
    assert [o.tokens for o in res["budget_sampled"]] == [o.tokens for o in res["budget_sampled_again"]]
    assert [o.tokens for o in res["budget_sampled"]] != [o.tokens for o in res["budget_greedy"]]


def test_context_limit_stops_generation(res):
    out = res["context_full"]
    assert out.finish_reason == "context" and len(out.tokens) == 3


def test_errors_name_the_setting(res):
    e = res["errors"]
    assert "context is 96" in e["too_long"] and "data.seq_length" in e["too_long"]
    assert "max_new_tokens" in e["budget_gt_max"] and "thinking_budget 8" in e["budget_gt_max"]
    assert "thinking_budget" in e["negative_budget"]
    assert "empty" in e["empty"]
