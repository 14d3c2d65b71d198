"""Mixed-source and mixed-modality RL batches on DP2 and PP2 (gloo): rollouts through the multimodal
model (image prompts from the task JSONL, the ViT frozen by config; chat prompts that think under a
budget of 2 tokens), rewards per source, statistics keyed by component name and identical on every
rank, the budget's forced tokens out of the loss. In bf16 (the engine and the training forward run
bf16 on CPU too; fp32 RL is covered by test_rl_stage / test_rl_trainer): the two round differently,
so the measured train-rollout mismatch is bf16-sized (~8e-4 nats here, ~1e-6 in fp32) but bounded."""
import json
import math
import os

import pytest
from distributed import run_distributed
from rl_workers import mixed_batches

IMAGES = os.path.join(os.path.dirname(__file__), "..", "..", "megatron_bluelm", "assets", "images")


def _task(tmp_path) -> str:
    rows = [{"messages": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b), "source": "math",
             "thinking_budget": 2} for a in range(3) for b in range(3)]
    rows += [{"prompt": "<image>what animal?", "images": [os.path.abspath(os.path.join(IMAGES, "chelsea.jpg"))],
              "answer": "cat", "source": "vqa"},
             {"prompt": "what is this?", "images": ["rocket.jpg"], "answer": "rocket", "source": "vqa"}]
    path = tmp_path / "images_src" / "task.jsonl"  # the second record's image is relative to this file
    path.parent.mkdir()
    os.symlink(os.path.abspath(os.path.join(IMAGES, "rocket.jpg")), path.parent / "rocket.jpg")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("layout", [["--parallel.pp", "2"], []], ids=["pp2-bf16", "dp2-bf16"])
def test_mixed_sources_and_modalities(tmp_path, layout):
    out = run_distributed(mixed_batches, 2, _task(tmp_path), [*layout, "--training.precision", "bf16"],
                          str(tmp_path), timeout=900)
    def values(steps):  # every logged value but the clocks (NaN: a component no sample of the step used)
        return [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in s.items()
                 if not (k.endswith("_s") or "per_s" in k or k == "tflops_per_gpu")} for s in steps]

    assert values(out[0]) == values(out[1])  # identical on both ranks
    for step in out[0]:
        assert {"reward/exact_match", "reward/format", "reward/image_qa"} <= set(step)
        assert step["update_tokens"] > 0 and step["kl"] >= 0
        # the budget's forced close is context, not loss: only sampled tokens are trained
        assert step["update_tokens"] == round((step["response_len"] - step["forced_tokens"]) * 16)
        assert 1e-5 < step["rollout_mismatch"] < 1e-2, step["rollout_mismatch"]  # bf16 rounding, nothing more
    assert any(s["forced_close_frac"] > 0 for s in out[0])
    both = [s for s in out[0] if not math.isnan(s["reward/image_qa"]) and not math.isnan(s["reward/exact_match"])]
    assert both, "no step drew text and image prompts together"
