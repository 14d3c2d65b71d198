"""The thinking-budget state machine and the samplers, without a model."""
import pytest
import torch

from megatron_bluelm.inference.budget import CLOSED, THINKING, ThinkingBudget
from megatron_bluelm.inference.sampling import (
    SamplingParams,
    filter_top_k,
    filter_top_p,
    sample,
)

THINK, END = 4, 5


def _run(budget: ThinkingBudget, i: int, proposals):
    """Feed the 'model' proposals through forcing; return the emitted tokens."""
    emitted = []
    for tok in proposals:
        forced = budget.forced_token(i)
        tok = tok if forced is None else forced
        budget.update(i, tok)
        emitted.append(tok)
    return emitted


def test_prompt_with_open_think_is_closed_at_budget():
    b = ThinkingBudget(THINK, END, [3])
    b.start([[10, 11, THINK]])
    assert b.samples[0].state == THINKING
    assert _run(b, 0, [20, 21, 22, 23, 24]) == [20, 21, 22, END, 24]
    assert b.samples[0].state == CLOSED and b.samples[0].count == 3


def test_bridge_tokens_follow_the_forced_close():
    b = ThinkingBudget(THINK, END, [1], bridge_ids=[7, 8])
    b.start([[THINK]])
    assert _run(b, 0, [20, 21, 22, 23, 24]) == [20, END, 7, 8, 24]


def test_budget_zero_closes_immediately_and_model_close_is_kept():
    b = ThinkingBudget(THINK, END, [0, 5])
    b.start([[1, THINK], [1, THINK]])
    assert _run(b, 0, [20, 21]) == [END, 21]
    assert _run(b, 1, [20, END, 22, 23, 24, 25, 26]) == [20, END, 22, 23, 24, 25, 26]  # closed by itself


def test_think_opened_by_the_model_and_closed_prompt_and_unlimited():
    b = ThinkingBudget(THINK, END, [2, 2, None])
    b.start([[1], [THINK, 9, END], [THINK]])
    assert _run(b, 0, [20, THINK, 21, 22, 23]) == [20, THINK, 21, 22, END]
    assert _run(b, 1, [20, 21, 22, 23]) == [20, 21, 22, 23]  # the prompt's think block is closed
    assert END not in _run(b, 2, list(range(20, 60)))


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.isinf(filter_top_k(logits, 2)[0, :2]).all() and torch.isfinite(filter_top_k(logits, 2)[0, 2:]).all()
    probs = logits.softmax(-1)[0]  # ~[0.03, 0.09, 0.24, 0.64]
    kept = torch.isfinite(filter_top_p(logits, 0.7))[0].tolist()
    assert kept == [False, False, True, True]
    assert torch.isfinite(filter_top_p(logits, float(probs[3]) - 1e-3))[0].tolist() == [False, False, False, True]


def test_sampling_is_seeded_and_respects_filters():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=3)
    a = sample(logits, p, torch.Generator().manual_seed(3))
    b = sample(logits, p, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    top5 = logits.topk(5).indices
    assert all(int(a[i]) in top5[i].tolist() for i in range(4))
    assert torch.equal(sample(logits, SamplingParams(), None), logits.argmax(-1))


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_params(bad):
    from megatron_bluelm.inference.errors import GenerationError

    with pytest.raises(GenerationError):
        SamplingParams(**bad).validate()
