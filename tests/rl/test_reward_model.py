"""The model-based reward hook: a scalar head on the BlueLM decoder."""
from distributed import run_distributed
from rl_workers import reward_model_checks


def test_scalar_reward_model():
    r = run_distributed(reward_model_checks, 1)[0]
    assert r["shape"] == (2,)
    assert r["padded_equal"]
    assert r["after"] > r["before"] + 0.5  # the pairwise loss taught it the preference
    assert len(r["hybrid"]) == 2 and r["hybrid"][0] != r["hybrid"][1]
