"""The GRPO update on the megatron model: at the first update of a batch the ratio is exactly 1 and the
KL to the (just copied) reference is 0; after an update both move. Same under TP2 and PP2."""
import pytest
from distributed import run_distributed
from rl_workers import first_update_stats


def _check(stats):
    first, second = stats["first"], stats["second"]
    assert first["ratio_mean"] == 1.0 and first["kl"] == 0.0
    assert first["update_tokens"] == 1 + 2 + 3 + 4 + 1 + 2 + 3 + 4  # response tokens only
    assert second["kl"] > 0.0  # the policy moved away from the reference
    # the second update keeps the batch's old log-probs (as updates_per_step > 1 does): ratio moved
    assert abs(second["ratio_mean"] - 1.0) > 1e-4


@pytest.mark.parametrize("world,extra", [(1, []), (2, ["--parallel.tp", "2"]), (2, ["--parallel.pp", "2"])])
def test_first_update_ratio_one_kl_zero(world, extra):
    results = run_distributed(first_update_stats, world, extra)
    last = results[-1]
    _check(last)
    assert last["moved"] > 0
    d = last["delta"]  # advantages were [1, -1, 0.5, -0.5, 2, -2, 0, 0]
    assert d[0] > 0 > d[1] and d[4] > 0 > d[5]  # the update raised the log-probs of A > 0 responses


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (0.7, 0.9)])
def test_token_logprobs_under_tp2(temperature, top_p):
    """The sampling distribution's log-probs and entropy from vocabulary-parallel logits (TP2: the
    vocab-parallel cross-entropy without a nucleus, gathered logits with one) equal the formula on the
    full logits; padding rows excluded; finite gradients."""
    import torch
    from rl_workers import tp_token_logprobs

    for r in run_distributed(tp_token_logprobs, 2, temperature, top_p):
        torch.testing.assert_close(r["logp"], r["ref"])
        torch.testing.assert_close(r["entropy"], r["ref_entropy"])
        assert r["grad_finite"]
