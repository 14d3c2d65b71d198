"""The generation engine under TP2 and PP2 (gloo ranks, the same layout-independent model): greedy
tokens equal 1 rank's in fp32, and PP2 in bf16 equals 1 rank in bf16 (hidden states cross the stages
in the model's dtype). In fp32, 1 rank's engine equals megatron-core's forward (reference.py), so every
layout does; in bf16 the two round differently (other kernels), which is not compared. Each layout also runs
packed prefill in rows of 16 tokens over prompts of 1-64 tokens (cut across rows, continued)."""
import pytest
from distributed import run_distributed
from gen_workers import parallel_greedy


@pytest.fixture(scope="module")
def one_rank():
    return run_distributed(parallel_greedy, 1, 1, 1, ("fp32", "bf16"), True)[0]


def test_one_rank_fp32_equals_reference(one_rank):
    assert one_rank["fp32"]["engine"] == one_rank["fp32"]["reference"]
    assert one_rank["fp32"]["mixed_chunked"] == one_rank["fp32"]["mixed_reference"]  # packed prefill


def test_tp2_matches_one_rank(one_rank):
    results = run_distributed(parallel_greedy, 2, 2, 1, ("fp32",))
    for r in results:
        assert r["fp32"]["engine"] == one_rank["fp32"]["engine"]
        assert r["fp32"]["mixed_chunked"] == one_rank["fp32"]["mixed_chunked"]


@pytest.mark.slow
def test_pp2_matches_one_rank_fp32_and_bf16(one_rank):
    results = run_distributed(parallel_greedy, 2, 1, 2)
    for r in results:
        assert r["fp32"]["engine"] == one_rank["fp32"]["engine"]
        assert r["bf16"]["engine"] == one_rank["bf16"]["engine"]
        assert r["fp32"]["mixed_chunked"] == one_rank["fp32"]["mixed_chunked"]
        assert r["bf16"]["mixed_chunked"] == one_rank["bf16"]["mixed_chunked"]
