"""The engine's per-token decision kernels (bluelm_kernels/decode_step.py) against their torch references, under
Triton's interpreter: the masked greedy pick (argmax ties, banned tokens, <think>/</think> per row state,
a fully banned vocabulary chunk) and the row-state update over random states that reach every branch
(forcing, budget reached with and without grace, UTF-8 pending, stop ids, limits, inactive rows)."""
import types

import pytest
import torch

from bluelm_kernels.decode_step import (
    SHARED_FIELDS,
    STATE_FIELDS,
    greedy_pick,
    greedy_pick_ref,
    update_rows,
    update_rows_ref,
)


@pytest.mark.parametrize("chunk", [8192, 2048, 3000])  # vocabulary pieces per program: ties across them
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_pick(dtype, chunk):
    rows, vocab = 5, 9000  # three 4096-wide chunks, the last one partial
    logits = torch.randn(rows, vocab).to(dtype)
    logits[0, 5000] = logits[0, 7048] = logits[0, 8048] = logits[0, 8500] = 50.0  # ties: the first index wins
    logits[1, 4] = 60.0  # <think>: masked once row 1 thinks
    logits[2, 5] = 60.0  # </think>: masked once row 2 has closed
    logits[3, 5] = 60.0  # </think> while thinking: allowed
    # the first chunk entirely banned but for the think tokens: rows that may not take them see a
    # chunk of -inf only (row 2's </think> and row 1's <think> are masked by their state)
    ban = torch.where(torch.arange(vocab) < 4096, float("-inf"), 0.0)
    ban[4], ban[5] = 0.0, 0.0
    think_ids = torch.tensor([4, 5])
    bstate = torch.tensor([0, 1, 2, 1, 0])
    tok, lp = greedy_pick(logits, ban, think_ids, bstate, chunk=chunk)
    tok_ref, lp_ref = greedy_pick_ref(logits, ban, think_ids, bstate)
    assert torch.equal(tok, tok_ref), (tok, tok_ref)
    assert torch.allclose(lp, lp_ref, atol=1e-5), (lp, lp_ref)
    assert tok[0] == 5000 and tok[1] != 4 and tok[2] != 5 and tok[3] == 5


def _state(rows: int, max_new: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)

    def ri(lo, hi, *shape):
        return torch.randint(lo, hi, shape or (rows,), generator=g)

    st = types.SimpleNamespace(
        token=ri(0, vocab), pos=ri(0, 50), gen=ri(0, max_new + 1), limit=ri(1, max_new + 1),
        limit_reason=ri(2, 4), active=ri(0, 4) > 0, finish=ri(0, 2), bstate=ri(0, 3), bcount=ri(0, 8),
        grace=ri(0, 3), budget=ri(-1, 8), force_idx=ri(-1, 4), utf8_pending=ri(0, 3),
        out_token=ri(0, vocab, rows, max_new), out_logp=torch.randn(rows, max_new, generator=g),
        out_forced=ri(0, 2, rows, max_new) > 0,
        close_ids=ri(0, vocab, 128), close_len=torch.tensor([3]), think_ids=torch.tensor([4, 5]),
        utf8=ri(-1, 4, vocab), sentence_end=ri(0, 3, vocab) == 0,
        stop_ids=torch.cat([torch.tensor([3, 7]), torch.full((14,), -1)]))
    st.close_ids[:3] = torch.tensor([9, 5, 11])
    # rows 0 and 1: thinking, budget reached inside a grace window; token 6 ends a sentence (the
    # close starts), token 8 does not (it waits)
    for r in (0, 1):
        st.active[r], st.bstate[r], st.force_idx[r], st.budget[r], st.bcount[r] = True, 1, -1, 2, 2
        st.grace[r], st.utf8_pending[r], st.gen[r], st.limit[r] = 2, 0, 0, max_new
    st.utf8[6] = st.utf8[8] = 0
    st.sentence_end[6], st.sentence_end[8] = True, False
    return st


def _tokens(rows: int, vocab: int, seed: int) -> torch.Tensor:
    tok = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed))
    tok[0], tok[1] = 6, 8
    return tok


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_rows(seed):
    rows, max_new, vocab = 1000, 6, 12  # several row blocks; a small vocabulary so every token id recurs
    st = _state(rows, max_new, vocab, seed)
    ref = types.SimpleNamespace(**{k: v.clone() for k, v in vars(st).items()})
    tok = _tokens(rows, vocab, seed + 10)
    lp = torch.randn(rows)
    n = rows - 7  # the last rows are outside the step: untouched
    update_rows(st, tok[:n], lp[:n], n)
    update_rows_ref(ref, tok[:n], lp[:n], n)
    for name in STATE_FIELDS + SHARED_FIELDS:
        assert torch.equal(getattr(st, name), getattr(ref, name)), name


def test_update_rows_reaches_every_branch():
    """The random states above are only a check if they exercise the state machine's branches."""
    rows, max_new, vocab = 200, 6, 12
    st = _state(rows, max_new, vocab, 0)
    before = types.SimpleNamespace(**{k: v.clone() for k, v in vars(st).items()})
    update_rows_ref(st, _tokens(rows, vocab, 10), torch.randn(rows), rows)
    act = before.active
    assert st.force_idx[0] == 0 and st.force_idx[1] == -1  # the grace window waits for a sentence end
    assert ((before.force_idx < 0) & (st.force_idx == 0) & act).any()  # a close started
    assert ((before.force_idx >= 0) & (st.force_idx == -1) & act).any()  # a close finished
    assert ((before.bstate == 0) & (st.bstate == 1)).any() and ((before.bstate == 1) & (st.bstate == 2)).any()
    assert ((st.finish == 1) & act).any() and ((st.finish >= 2) & act & (before.finish != st.finish)).any()
    assert (act & ~st.active).any() and (act & st.active).any()
