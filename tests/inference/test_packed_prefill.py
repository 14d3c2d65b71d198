"""Packed prefill (prompts back to back in one row, positions restarting per prompt, attention within
each prompt): the same greedy tokens, log-probs and last hidden states as right-padded rows, as
megatron-core's forward and as a full no-cache forward, for prompts of 1, 7, 33 and 64 tokens; rows of
16 tokens (prompts cut at a row's end and continued against their slot's cache); groups of identical
prompts sharing one prefill; the row layout itself."""
import math

import pytest
import torch
from distributed import run_distributed
from gen_workers import model_overrides
from prefill_workers import GROUPED, MIXED, packed_prefill_checks

from megatron_bluelm.inference.attention import continued_prefill_attention
from megatron_bluelm.inference.batcher import pack_prefill_rows
from megatron_bluelm.inference.stage import PackedRow, attention_length

ENGINES = ("packed", "padded", "chunked", "small")


@pytest.fixture(scope="module")
def res():
    return run_distributed(packed_prefill_checks, 1, model_overrides(precision="fp32"))[0]


def test_greedy_equals_padded_rows_and_megatron_forward(res):
    assert res["greedy"]["packed"] == res["greedy"]["padded"] == res["reference"]
    assert res["greedy"]["chunked"] == res["greedy"]["small"] == res["reference"]
    assert all(len(t) == 8 for t in res["reference"])


@pytest.mark.parametrize("name", ENGINES)
def test_logprobs_equal_full_forward(res, name):
    for _, got, expected in res["logprobs"][name]:
        assert len(got) == len(expected) == 8 and all(math.isfinite(g) for g in got)
        assert max(abs(g - e) for g, e in zip(got, expected)) < 1e-4, (name, got, expected)
    # sampled tokens (per-sample RNG) are the same whichever way the prompts were prefilled
    assert [t for t, _, _ in res["logprobs"][name]] == [t for t, _, _ in res["logprobs"]["padded"]]


@pytest.mark.parametrize("name", ENGINES)
def test_last_hidden_state_per_prompt_equals_full_forward(res, name):
    same_prompts, worst = res["hidden"][name]
    assert same_prompts  # one hidden state per prompt with something to prefill (not the 1-token one)
    assert worst < 1e-4, worst


def test_packed_rows_compute_no_padding(res):
    useful = sum(len(p) - 1 for p in MIXED)
    packed, padded, chunked, small = (res["stats"][n] for n in ENGINES)
    assert packed == {"prefill_tokens": useful, "prefill_computed": useful, "prefill_calls": 1}
    assert padded["prefill_tokens"] == useful and padded["prefill_computed"] == 3 * 63  # 3 rows padded to 63
    assert chunked == {"prefill_tokens": useful, "prefill_computed": useful, "prefill_calls": math.ceil(useful / 16)}
    # 3 prompts to prefill (6, 32, 63 tokens): 4 rows of 64 positions in one call
    assert small == {"prefill_tokens": useful, "prefill_computed": 4 * 64, "prefill_calls": 1}


def test_groups_share_one_prefill_when_packed(res):
    once = sum(len(p) - 1 for p in {tuple(p) for p in GROUPED})
    for name in ENGINES:
        assert res["group_prefill"][name] == once
        assert res["grouped"][name] == res["grouped"]["padded"]
    toks = res["grouped"]["packed"]
    assert len({tuple(t) for t in toks[:3]}) == 3, "a group's samples must draw different tokens"


def test_rows_are_full_and_only_a_row_head_continues():
    lengths = [5, 0, 16, 3, 40, 1]
    rows = pack_prefill_rows(lengths, 16)
    assert [sum(n for _, _, n in r) for r in rows] == [16, 16, 16, 16, 1]
    covered = {}
    for r in rows:
        for j, (i, start, n) in enumerate(r):
            assert n > 0 and (start == 0 or j == 0)
            assert start == covered.get(i, 0)  # each prompt's pieces in order, back to back
            covered[i] = start + n
    assert covered == {i: n for i, n in enumerate(lengths) if n}


def test_packed_row_layout():
    row = PackedRow.build([(10, 3, [4]), (0, 2, [1, 2]), (0, 4, [0])], torch.device("cpu"), 16)
    assert row.tokens == 9 and (row.head, row.head_start, row.head_slot) == (3, 10, 4)
    assert row.pos.tolist() == [10, 11, 12, 0, 1, 0, 1, 2, 3]
    assert row.last.tolist() == [2, 4, 8]
    assert row.doc.shape == (1, 128) and row.doc[0, :6].tolist() == [0, 0, 1, 1, 1, 1]
    assert (row.doc[0, 6:] == 2).all()  # the attention's padding (122 tokens): one more document
    pad = PackedRow.build([(0, 200, [0])], torch.device("cpu"), 16384).doc[0]
    assert pad.shape == (512,) and pad.bincount().tolist() == [200, 128, 128, 56]  # padding in 128-token documents
    writes = sorted(zip(row.write_slot.tolist(), row.write_pos.tolist(), row.write_src.tolist()))
    assert writes == [(0, 0, 5), (0, 1, 6), (0, 2, 7), (0, 3, 8), (1, 0, 3), (1, 1, 4), (2, 0, 3), (2, 1, 4),
                      (4, 10, 0), (4, 11, 1), (4, 12, 2)]
    with pytest.raises(ValueError, match="first piece"):
        PackedRow.build([(0, 2, [0]), (5, 2, [1])], torch.device("cpu"), 16)


def test_attention_lengths_are_few():
    assert {attention_length(n, 16384) for n in range(1, 16385)} == {512 << k for k in range(6)}
    assert attention_length(9000, 10000) == 10112 and attention_length(5, 16) == 128


def test_continued_piece_sees_its_cached_prefix_causally():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    allowed = torch.arange(12)[None, :] <= torch.arange(7, 12)[:, None]
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8)
    ref = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(continued_prefill_attention(q, k, v), ref, atol=1e-5, rtol=1e-5)
