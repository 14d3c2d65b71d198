"""Greedy generation is token-identical under TP1, TP2 and PP2 (gloo ranks, same seeded model)."""
import pytest
from distributed import run_distributed
from gen_workers import greedy_tokens, model_overrides


@pytest.fixture(scope="module")
def tp1():
    return run_distributed(greedy_tokens, 1, model_overrides())[0]


def test_tp2_matches_tp1(tp1):
    results = run_distributed(greedy_tokens, 2, model_overrides(tp=2))
    assert results[0] == results[1] == tp1


@pytest.mark.slow
def test_pp2_matches_tp1(tp1):
    results = run_distributed(greedy_tokens, 2, model_overrides(pp=2))
    assert results[0] == results[1] == tp1
