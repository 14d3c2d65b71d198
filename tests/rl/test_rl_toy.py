"""The GRPO toy (examples/rl_toy.yaml): after supervised fine-tuning on the format only, RL raises the
greedy accuracy on the evaluation prompts clearly (seeded, CPU), and writes its curves as a PNG."""
import os

import pytest
from distributed import run_distributed
from rl_workers import rl_stage


@pytest.mark.slow
def test_toy_heldout_accuracy_rises(tmp_path):
    out = run_distributed(rl_stage, 1, "examples/rl_toy.yaml", ["--logging.output_dir", str(tmp_path)],
                          timeout=1500)[0]
    evals, steps = out["eval"], out["rl"]
    assert [e["step"] for e in evals] == [0, 10, 20]
    assert evals[-1]["accuracy"] >= evals[0]["accuracy"] + 0.2, evals
    # every update began at ratio 1 (old log-probs recomputed) with the rollout's own distribution
    assert all(s["first_ratio_mean"] == 1.0 for s in steps if not s.get("skipped_update"))
    assert all(s["rollout_mismatch"] < 1e-3 for s in steps if "rollout_mismatch" in s)
    for name in ("rl_curves.png", "metrics.jsonl"):
        assert os.path.getsize(tmp_path / name) > 0
