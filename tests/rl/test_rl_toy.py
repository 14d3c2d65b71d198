"""The GRPO toy (examples/rl_toy.yaml): after supervised fine-tuning on the format only, RL raises the
greedy accuracy on the evaluation prompts clearly (seeded, CPU), and writes its curves as a PNG."""
import os

import pytest
from distributed import run_distributed
from rl_workers import rl_stage


@pytest.mark.slow
def test_toy_heldout_accuracy_rises(tmp_path):
    out = run_distributed(rl_stage, 1, "examples/rl_toy.yaml", ["--logging.output_dir", str(tmp_path),
                                                                "--rl.eval_samples", "2"], timeout=1500)[0]
    evals, steps = out["eval"], out["rl"]
    assert [e["step"] for e in evals] == [0, 10, 20]
    assert all(0 <= e["sampled_accuracy"] <= 1 for e in evals)  # pass@1 at the rollout temperature
    assert evals[-1]["accuracy"] >= evals[0]["accuracy"] + 0.2, evals
    # every update began at ratio 1 (old log-probs recomputed) with the rollout's own distribution
    assert all(s["first_ratio_mean"] == 1.0 for s in steps if not s.get("skipped_update"))
    assert all(s["rollout_mismatch"] < 1e-3 for s in steps if "rollout_mismatch" in s)
    for name in ("rl_curves.png", "metrics.jsonl"):
        assert os.path.getsize(tmp_path / name) > 0


def test_jsonl_heldout_records_are_each_evaluated_once(tmp_path):
    """A held-out JSONL is evaluated as it is: its first rl.eval_prompts records, each once, in order
    (not a draw with replacement, which repeats some problems and skips others)."""
    import json

    from megatron_bluelm.rl.tasks import load_task
    from megatron_bluelm.stages.rl import eval_records

    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(5)))
    task = load_task(str(path))
    assert [r["prompt"] for r in eval_records(task, 64, seed=0)] == [f"{i}+1=" for i in range(5)]
    assert [r["prompt"] for r in eval_records(task, 3, seed=0)] == ["0+1=", "1+1=", "2+1="]
