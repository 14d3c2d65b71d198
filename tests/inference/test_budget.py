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


# -- the engine's device-side state machine (decode_state.advance) on synthetic one-hot logits -------
V = 64
LEAD3, CONT, DOT = 50, 51, 60  # a lead byte of a 3-byte UTF-8 character, a continuation byte, "."
DEV_CLOSE = [61, END, 62]


def _state(budget, grace=0, bstate=None, limit=30):
    from megatron_bluelm.inference import decode_state as ds

    st = ds.DecodeState(1, 32, V, torch.device("cpu"))
    st.active[0], st.limit[0], st.limit_reason[0] = True, limit, ds.FINISH_LENGTH
    st.bstate[0] = ds.THINKING if bstate is None else bstate
    st.budget[0], st.grace[0] = budget, grace
    st.close_ids[:len(DEV_CLOSE)] = torch.tensor(DEV_CLOSE)
    st.close_len.fill_(len(DEV_CLOSE))
    st.think_ids.copy_(torch.tensor([THINK, END]))
    st.utf8[LEAD3], st.utf8[CONT] = 2, -1
    st.sentence_end[DOT] = True
    return st


def _drive(st, proposals):
    """Each step the 'model' puts all mass on one token; returns (emitted tokens, forced mask)."""
    from megatron_bluelm.inference.decode_state import advance

    for tok in proposals:
        logits = torch.zeros(1, V)
        logits[0, tok] = 20.0
        advance(st, logits, 1, False)
    n = int(st.gen[0])
    return st.out_token[0, :n].tolist(), st.out_forced[0, :n].tolist()


def test_device_budget_closes_at_the_budget_with_the_close_sequence():
    st = _state(budget=3)
    toks, forced = _drive(st, [20, 21, 22, 23, 24, 25, 26])
    assert toks == [20, 21, 22, *DEV_CLOSE, 26]
    assert forced == [False] * 3 + [True] * 3 + [False]
    assert int(st.bcount[0]) == 3


def test_device_budget_never_splits_a_utf8_character():
    # the budget (2) is reached on a lead byte: forcing waits for its two continuation bytes
    st = _state(budget=2)
    toks, forced = _drive(st, [20, LEAD3, CONT, CONT, 30, 31, 32, 33])
    assert toks == [20, LEAD3, CONT, CONT, *DEV_CLOSE, 33]
    assert forced.index(True) == 4
    # a continuation byte on its own (the character began before the budget) also finishes first
    st = _state(budget=1)
    toks, _ = _drive(st, [LEAD3, CONT, CONT, 30, 31, 32])
    assert toks == [LEAD3, CONT, CONT, *DEV_CLOSE]


def test_device_budget_grace_waits_for_a_sentence_end():
    st = _state(budget=2, grace=3)
    toks, _ = _drive(st, [20, 21, 22, DOT, 40, 41, 42, 43])
    assert toks == [20, 21, 22, DOT, *DEV_CLOSE, 43]  # closed after the "." (within the grace)
    st = _state(budget=2, grace=3)
    toks, _ = _drive(st, [20, 21, 22, 23, 24, 40, 41, 42, 43])
    assert toks == [20, 21, 22, 23, 24, *DEV_CLOSE, 43]  # no sentence end: closed after budget + grace


def test_device_bans_think_tokens_after_the_close():
    from megatron_bluelm.inference import decode_state as ds

    st = _state(budget=1)
    toks, _ = _drive(st, [20, 21, 22, 23, END, THINK, END, 30])
    after = toks[1 + len(DEV_CLOSE):]
    assert toks[:4] == [20, *DEV_CLOSE] and int(st.bstate[0]) == ds.CLOSED
    assert END not in after and THINK not in after and after[-1] == 30
    # while thinking, a second <think> is never sampled; the model's own </think> closes the block
    st = _state(budget=-1)
    toks, forced = _drive(st, [THINK, 20, END, 21])
    assert toks[0] != THINK and toks[1:] == [20, END, 21] and not any(forced)
    assert int(st.bcount[0]) == 2 and int(st.bstate[0]) == ds.CLOSED


def test_device_counts_only_sampled_thinking_tokens():
    from megatron_bluelm.inference import decode_state as ds

    st = _state(budget=-1, bstate=ds.BEFORE)  # a prompt without an open think block
    _drive(st, [20, 21, THINK, 22, 23, END, 24])
    assert int(st.bcount[0]) == 2  # tokens before <think> and after </think> do not count


def test_device_last_step_of_a_row_is_counted():
    st = _state(budget=-1, limit=3)
    toks, _ = _drive(st, [20, 21, 22])
    assert len(toks) == 3 and not bool(st.active[0])
    assert int(st.bcount[0]) == 3
