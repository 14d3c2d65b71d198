"""The toy GRPO run (examples/rl_toy.yaml) learns: the mean reward rises clearly (seeded, CPU)."""
import pytest
from distributed import run_distributed
from rl_workers import toy_run


@pytest.mark.slow
def test_toy_reward_rises():
    steps = run_distributed(toy_run, 1, [], timeout=1500)[0]
    rewards = [s["reward"] for s in steps]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert len(rewards) == 40
    assert last > first + 0.15, (first, last, rewards)
    # every update that ran began at ratio 1 (old log-probs recomputed) and was logged
    assert all(s["first_ratio_mean"] == 1.0 for s in steps if not s.get("skipped_update"))
    assert all(0.0 <= s["reward"] <= 1.0 for s in steps)
