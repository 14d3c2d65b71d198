"""DAPO dynamic sampling: zero-variance groups are refilled by new prompts, up to the round cap."""
from types import SimpleNamespace

import megatron_bluelm.stages.rl as stage
from megatron_bluelm.rl.rollout import Rollouts


class FakeTask:
    name = "fake"

    def records(self, n, seed):
        return [{"prompt": f"p{seed}-{i}", "answer": "1", "source": "fake"} for i in range(n)]


def _fake_round(variance_of):
    """A rollout round whose groups have reward variance where ``variance_of(prompt)`` says so."""
    def round_(self, records, seed, rl):
        g = rl.group_size
        samples = [dict(r) for r in records for _ in range(g)]
        scored = []
        for r in records:
            rewards = [1.0] + [0.0] * (g - 1) if variance_of(r["prompt"]) else [0.0] * g
            scored += [{"reward": x} for x in rewards]
        n = len(samples)
        roll = Rollouts(records=samples, prompts=[[1]] * n, responses=[[2]] * n, texts=["x"] * n,
                        thinking_tokens=[0] * n, forced=[[False]] * n, logprobs=[[0.0]] * n,
                        finish_reasons=["stop"] * n, forced_close=[False] * n)
        return roll, samples, scored
    return round_


def _collect(monkeypatch, rounds, variance_of, k=4, g=2):
    rl = SimpleNamespace(prompts_per_step=k, group_size=g, seed=3, dynamic_sampling_rounds=rounds)
    run = SimpleNamespace(cfg=SimpleNamespace(rl=rl))
    monkeypatch.setattr(stage, "_dp", lambda: (0, 1))
    monkeypatch.setattr(stage.Sampler, "_round", _fake_round(variance_of))
    return stage.Sampler(run, None, FakeTask(), None, None).collect(step=5)


def test_refill_replaces_flat_groups(monkeypatch):
    # first round: only prompt 0 varies; later rounds: every prompt varies
    varies = lambda p: p.endswith("-0") or not p.startswith("p8")  # noqa: E731 (round 0 seed is 3 + 5)
    got = _collect(monkeypatch, rounds=3, variance_of=varies)
    assert got["refill_rounds"] == 1 and got["generated_groups"] == 8
    rewards = [s["reward"] for s in got["scored"]]
    assert len(rewards) == 8 and all(len(set(rewards[i:i + 2])) == 2 for i in range(0, 8, 2))  # all varied


def test_refill_stops_at_the_cap_and_keeps_the_batch_size(monkeypatch):
    got = _collect(monkeypatch, rounds=2, variance_of=lambda p: False)
    assert got["refill_rounds"] == 2 and got["generated_groups"] == 12
    assert len(got["scored"]) == 8  # still k groups: the flat ones are filtered from the loss


def test_no_refill_when_off(monkeypatch):
    got = _collect(monkeypatch, rounds=0, variance_of=lambda p: False)
    assert got["refill_rounds"] == 0 and got["generated_groups"] == 4
