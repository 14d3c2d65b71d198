"""The RL stage end to end on the tiny model (CPU, gloo): what the policy is trained on, the schedule,
the statistics, starting from and resuming checkpoints, configuration errors."""
import os

import pytest
from distributed import run_distributed
from rl_workers import checkpoint_story, rl_stage, stage_then_error

TOY = "examples/rl_toy.yaml"
SMALL = ["--rl.warmup_sft_steps", "2", "--training.train_steps", "2", "--rl.prompts_per_step", "8",
         "--rl.group_size", "4", "--training.micro_batch_size", "8", "--rl.updates_per_step", "2",
         "--logging.log_interval", "1", "--rl.filter_zero_variance", "false"]


def _run(tmp_path, extra, world=1, **kw):
    over = SMALL + ["--logging.output_dir", str(tmp_path / "log"), *extra]
    return run_distributed(rl_stage, world, TOY, over, kw.get("pretrained"), kw.get("collect"), timeout=900)


def test_logprobs_schedule_and_stats(tmp_path):
    """Temperature 0.7, top-p 0.9: the trainer's log-prob of every sampled token is the one the sampler
    drew it with (mean |log p_train - log p_rollout| at kernel noise, < 1e-3; the raw softmax is ~0.1 nats off
    here). The LR schedule spans every optimizer update (warm-up + steps x updates_per_step), and the
    logged statistics cover both mini-batches of a step."""
    from rl_workers import scheduler_decay_steps

    out = _run(tmp_path, ["--rl.temperature", "0.7", "--rl.top_p", "0.9", "--schedule.style", "cosine",
                          "--optimizer.min_lr", "1e-4", "--rl.warmup_sft_steps", "1"],
               collect=scheduler_decay_steps)[0]
    assert out["collected"] == 1 + 2 * 2
    for step in out["rl"]:
        assert step["rollout_mismatch"] < 1e-3, step["rollout_mismatch"]
        assert step["first_ratio_mean"] == 1.0 and step["updates"] == 2
        assert step["update_tokens"] == round(step["response_len"] * 8 * 4)  # all tokens, both mini-batches
    assert out["rl"][-1]["lr"] < out["rl"][0]["lr"]
    assert os.path.isfile(tmp_path / "log" / "rl_curves.png")


def test_pretrained_start_and_exact_resume(tmp_path):
    """--pretrained starts RL at step 0 from a pretrain checkpoint's weights, with the KL anchor = those
    weights; checkpoint.load of that (non-RL) checkpoint is refused; an RL checkpoint resumes exactly
    (same anchor: the KL of the resumed step equals the straight run's)."""
    over = SMALL + ["--logging.output_dir", str(tmp_path / "log"), "--rl.kl_coef", "0.05",
                    "--rl.warmup_sft_steps", "0", "--training.train_steps", "3"]
    out = run_distributed(checkpoint_story, 1, str(tmp_path), TOY, over, timeout=900)[0]
    assert "non-RL" in out["error"] and "--pretrained" in out["error"]
    assert out["started"]["step"] == 1 and out["started"]["collected"] is True  # RL's steps; anchor = loaded
    straight, resumed = out["straight"], out["resumed"]
    assert resumed["step"] == 3 and len(resumed["rl"]) == 1
    for key in ("reward", "loss", "kl", "entropy", "grad_norm"):
        assert straight["rl"][2][key] == resumed["rl"][0][key], (key, straight["rl"][2][key], resumed["rl"][0][key])
    assert straight["rl"][2]["kl"] > 0  # the policy has moved away from the saved anchor


@pytest.mark.parametrize("bad,match", [(["--rl.loss_agg", "token-sum"], "rl.loss_agg"),
                                       (["--rl.rollout_is", "ppo"], "rl.rollout_is"),
                                       (["--rl.dual_clip", "0.5"], "rl.dual_clip"),
                                       (["--rl.rewards", '{"default": {"model": 1.0}}'], "rl.reward_model")])
def test_config_errors(tmp_path, bad, match):
    """Checked before any process group or model exists: run in this process."""
    err = stage_then_error(TOY, SMALL + ["--logging.output_dir", str(tmp_path / "l"), *bad])
    assert err is not None and match in err, err


def test_benchmark_evaluation_inside_rl(tmp_path):
    """training.eval_benchmarks runs in the RL stage as in SFT: accuracy and thinking tokens per budget
    of the bundled arithmetic set logged as split 'eval' at each evaluation."""
    from megatron_bluelm.eval.plots import read_metrics

    _run(tmp_path, ["--training.train_steps", "1", "--rl.warmup_sft_steps", "0", "--data.seq_length", "128",
                    "--training.eval_interval", "1", "--training.eval_benchmarks", "arithmetic",
                    "--training.eval_limit", "2", "--training.eval_budgets", "0,2",
                    "--training.eval_max_new_tokens", "8", "--training.eval_answer_tokens", "4"])
    evals = [r for r in read_metrics(str(tmp_path / "log")) if r["split"] == "eval"]
    assert evals and evals[-1]["step"] == 1
    r = evals[-1]
    assert 0 <= r["arithmetic/nothink/accuracy"] <= 1 and r["arithmetic/nothink/thinking_tokens"] == 0
    assert 0 < r["arithmetic/2/thinking_tokens"] <= 2
