"""End to end on the tiny model: SFT with periodic benchmark evaluation, then tools/evaluate.py over
thinking budgets on the checkpoint. Per-item thinking lengths never exceed the budget (and the
budget binds: unlimited thinking runs longer, budgeted samples show the forced close and bridge);
an interrupted sweep resumed gives the uninterrupted summary; the PNG is written."""
import json
import os

import pytest
from distributed import run_distributed
from eval_workers import evaluate_main, image_sweep, sft_then_evaluate

from megatron_bluelm.data.sft import DEFAULT_BRIDGE
from megatron_bluelm.eval.plots import read_metrics

BUDGETS = [0, 2, 5, None]
ARGV = ["--bench", "arithmetic", "--bench", "word_problems", "--limit", "3", "--budgets", "0,2,5,none",
        "--max-new-tokens", "12", "--answer-tokens", "4", "--batch-size", "2"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_toy")
    return str(tmp), run_distributed(sft_then_evaluate, 1, str(tmp), ARGV, 2)[0]


@pytest.mark.slow
def test_thinking_never_exceeds_the_budget(toy):
    _, out = toy
    rows = out["full_rows"]
    assert len(rows) == 2 * 3 * len(BUDGETS)
    spent = {}
    for r in rows:
        budget = None if r["budget"] == "inf" else 0 if r["budget"] == "nothink" else int(r["budget"])
        for s in r["samples"]:
            spent.setdefault(r["budget"], []).append(s["thinking_tokens"])
            if budget is not None:
                assert s["thinking_tokens"] <= budget, (r["where"], r["budget"], s)
            if s["forced_close"]:  # the engine closed the block: </think>, then the bridge SFT teaches
                assert "</think>" in s["response"] and DEFAULT_BRIDGE.strip() in s["response"], s["response"]
        assert r["prompt"].endswith("<think>\n" if budget != 0 else "<think>\n\n</think>\n")
    assert set(spent["nothink"]) == {0}
    assert max(spent["inf"]) > 5, "unlimited thinking must run past the budgets, or the test shows nothing"
    assert any(s["forced_close"] for r in rows if r["budget"] == "2" for s in r["samples"])
    summary = out["full"]["benchmarks"]
    for name in ("arithmetic", "word_problems"):
        b = summary[name]["budgets"]
        assert list(b) == ["nothink", "2", "5", "inf"]
        assert b["2"]["max_thinking_tokens"] <= 2 and b["5"]["max_thinking_tokens"] <= 5


@pytest.mark.slow
def test_resumed_sweep_gives_the_same_summary(toy):
    _, out = toy
    strip = lambda s: {k: v for k, v in s.items() if k not in ("throughput",)}  # noqa: E731
    assert strip(out["part"]) == strip(out["full"])
    assert out["part"]["throughput"]["items"] == len(out["full_rows"]) - 2  # only the missing items ran again
    key = lambda r: (r["bench"], r["budget"], r["id"])  # noqa: E731
    assert sorted(out["part_rows"], key=key) == sorted(out["full_rows"], key=key)


@pytest.mark.slow
def test_outputs_written_and_periodic_eval_logged(toy):
    tmp, _ = toy
    png = os.path.join(tmp, "full", "budget.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
    table = open(os.path.join(tmp, "full", "table.md")).read()
    assert "| word_problems | none | think | 3 |" in table
    json.load(open(os.path.join(tmp, "full", "summary.json")))
    evals = [r for r in read_metrics(os.path.join(tmp, "run")) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0 <= r["arithmetic/nothink/accuracy"] <= 1 and 0 <= r["arithmetic/2/accuracy"] <= 1
        assert r["arithmetic/nothink/thinking_tokens"] == 0 and 0 < r["arithmetic/2/thinking_tokens"] <= 2


@pytest.mark.slow
def test_hf_export_sweep_matches_the_engine(toy):
    """The HF path (transformers, its chat template, the same budget rule) gives the engine's verdicts,
    thinking lengths, forced closes and lengths on the exported weights (greedy, fp32)."""
    _, out = toy
    ours = {(r["budget"], r["id"]): r for r in out["full_rows"] if r["bench"] == "arithmetic"}
    hf = {(r["budget"], r["id"]): r for r in out["hf_eval_rows"]}
    assert sorted(hf) == sorted(ours)
    fields = ("correct", "answer", "thinking_tokens", "tokens", "finish_reason", "forced_close")
    for key, row in hf.items():
        assert row["prompt"] == ours[key]["prompt"], key
        assert [{f: s[f] for f in fields} for s in row["samples"]] == \
            [{f: s[f] for f in fields} for s in ours[key]["samples"]], key


@pytest.mark.slow
def test_pipeline_parallel_sweep_equals_one_rank(toy):
    """Under PP2 (rank 0, which writes, holds no logits) every rank makes the same calls and the
    results equal the single-rank sweep's."""
    tmp, out = toy
    argv = ["--checkpoint", os.path.join(tmp, "ckpt"), "--no-progress", "--pp", "2",
            "--output", os.path.join(tmp, "pp2"), "--bench", "arithmetic", "--limit", "3",
            "--budgets", "0,2,none", "--max-new-tokens", "12", "--answer-tokens", "4", "--batch-size", "2"]
    run_distributed(evaluate_main, 2, argv)
    with open(os.path.join(tmp, "pp2", "results.jsonl")) as f:
        rows = [json.loads(x) for x in f][1:]
    ours = {(r["budget"], r["id"]): r["samples"] for r in out["full_rows"] if r["bench"] == "arithmetic"}
    assert len(rows) == 9 and all(r["samples"] == ours[(r["budget"], r["id"])] for r in rows)


@pytest.mark.slow
def test_image_questions_reach_the_multimodal_engine():
    """The bundled image set through the harness on a tiny multimodal model (random weights):
    images are loaded, tiled and spliced for every sample; budgets hold as for text."""
    out = run_distributed(image_sweep, 1, [0, 2])[0]
    assert out["nothink"]["items"] == 2 and out["nothink"]["mean_thinking_tokens"] == 0
    assert out["2"]["items"] == 2 and out["2"]["max_thinking_tokens"] <= 2
