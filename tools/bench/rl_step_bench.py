"""One RL step of the full decoder on one GPU, split into rollout / log-probs / update.

    python tools/bench/rl_step_bench.py                      # bluelm-2.5-3b decoder, 64 prompts x 8, budget 512
    python tools/bench/rl_step_bench.py --tiny --prompts 4 --group 2 --budget 8 --steps 2   # CPU smoke run

The prompts are synthetic chat questions (a JSONL written next to the output); the model is randomly
initialized (vocabulary 100k, the report's size), so every sample earns the same reward: the run keeps
zero-variance groups in the loss (``rl.filter_zero_variance false``) to time the update anyway, and
KL (k3) to the reference and TIS against the rollout log-probs on, as in a real run. Each step prints
its three phases; the summary is the mean over the steps after the first (CUDA graphs, allocator and
kernel warm-up happen in step 1). Rollouts generate up to ``--budget`` new tokens per sample, with a
thinking budget of ``--budget - --answer-room`` tokens, then the forced close and the answer.

The peer figure printed beside the update is the same rows through the shared loop's supervised train
step (tokens/s of ``training.step.train_step``): what the GRPO loss path costs over plain cross-entropy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)


def write_prompts(path: str, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            q = f"Compute {17 + i} times {23 + 2 * i}, then add {i}. Think step by step."
            answer = str((17 + i) * (23 + 2 * i) + i)
            f.write(json.dumps({"messages": [{"role": "user", "content": q}], "answer": answer,
                                "source": "math"}) + "\n")


def overrides(a, task: str, out: str) -> list[str]:
    think = max(a.budget - a.answer_room, 0)
    seq = a.seq_length or (a.budget + 96)
    model = ["--model.preset", "tiny"] if a.tiny else ["--model.preset", a.preset, "--model.vocab_size", "100000"]
    return [*model, "--data.mock", "true", "--data.seq_length", str(seq), "--rl.task", task,
            "--rl.prompts_per_step", str(a.prompts), "--rl.group_size", str(a.group),
            "--rl.max_new_tokens", str(a.budget), "--rl.thinking_budget", str(think), "--rl.bridge_text", "",
            "--rl.rewards", '{"math": {"math_boxed": 1.0, "format": 0.1}, "default": {"exact_match": 1.0}}',
            "--rl.filter_zero_variance", "false", "--rl.kl_coef", "0.01", "--rl.rollout_is", "tis",
            "--rl.updates_per_step", str(a.updates), "--training.micro_batch_size", str(a.mbs),
            "--training.train_steps", str(a.steps), "--training.eval_interval", "0",
            "--schedule.style", "constant", "--schedule.warmup_steps", "0",
            "--logging.output_dir", out, "--logging.log_interval", "1", "--logging.tensorboard", "false"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bluelm-2.5-3b")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset (CPU smoke run)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--budget", type=int, default=512, help="new tokens per sample (max_new_tokens)")
    ap.add_argument("--answer-room", type=int, default=32, help="tokens left after the thinking budget")
    ap.add_argument("--seq-length", type=int, default=None, help="default: budget + 96 (prompt room)")
    ap.add_argument("--mbs", type=int, default=8, help="micro-batch size of log-probs and updates")
    ap.add_argument("--updates", type=int, default=1, help="rl.updates_per_step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the per-step figures here")
    a = ap.parse_args(argv)

    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.stages.rl import run_rl

    tmp = tempfile.mkdtemp(prefix="rl_bench_")
    task = os.path.join(tmp, "prompts.jsonl")
    write_prompts(task, max(a.prompts, 8))
    cfg = load_config(None, overrides(a, task, os.path.join(tmp, "log")))
    t0 = time.perf_counter()
    steps = run_rl(cfg, collect=lambda run: _peer_train_step(run, a))
    peer = steps.get("collected")
    hist = steps["rl"]
    rows = []
    for i, s in enumerate(hist, 1):
        tokens = a.prompts * a.group * s["response_len"]
        rows.append({"step": i, "rollout_s": s["rollout_s"], "logprob_s": s["logprob_s"], "update_s": s["update_s"],
                     "rollout_tokens_per_s": s["rollout_tokens_per_s"], "response_len": s["response_len"],
                     "thinking_len": s["thinking_len"], "forced_close_frac": s["forced_close_frac"],
                     "rollout_mismatch": s.get("rollout_mismatch"), "tokens": tokens})
        print(f"step {i}: rollout {s['rollout_s']:.2f} s ({s['rollout_tokens_per_s']:,.0f} tok/s) | "
              f"log-probs (old + ref) {s['logprob_s']:.2f} s | update {s['update_s']:.2f} s | "
              f"resp len {s['response_len']:.1f} think {s['thinking_len']:.1f} forced {s['forced_close_frac']:.0%}"
              + (f" | |lp train-rollout| {s['rollout_mismatch']:.2e}" if s.get("rollout_mismatch") is not None else ""),
              flush=True)
    timed = rows[1:] or rows
    mean = {k: sum(r[k] for r in timed) / len(timed) for k in ("rollout_s", "logprob_s", "update_s")}
    total = sum(mean.values())
    print(f"\nmean over steps {timed[0]['step']}..{timed[-1]['step']} ({a.prompts} prompts x {a.group} samples, "
          f"budget {a.budget}): rollout {mean['rollout_s']:.2f} s ({mean['rollout_s'] / total:.0%}) | log-probs "
          f"{mean['logprob_s']:.2f} s ({mean['logprob_s'] / total:.0%}) | update {mean['update_s']:.2f} s "
          f"({mean['update_s'] / total:.0%}) | step {total:.2f} s")
    if peer:
        seq = cfg.data.seq_length
        upd_tps = a.prompts * a.group * seq / max(mean["update_s"], 1e-9)
        print(f"update {upd_tps:,.0f} row-tokens/s vs the supervised train step on the same rows "
              f"{peer['tokens_per_s']:,.0f} tokens/s ({upd_tps / peer['tokens_per_s']:.2f}x)")
    print(f"wall {time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "steps": rows, "mean": mean, "peer": peer}, f, indent=1)
    return 0


def _peer_train_step(run, a) -> dict:
    """The shared loop's supervised step on rows of the bench's shape (prompt + full budget)."""
    import torch

    from megatron_bluelm.rl.rollout import training_rows
    from megatron_bluelm.rl.trainer import micro_batches
    from megatron_bluelm.training.step import train_step

    seq = run.cfg.data.seq_length
    n = a.prompts * a.group
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 8000, (seq - a.budget - 1,), generator=gen).tolist() for _ in range(n)]
    resp = [torch.randint(100, 8000, (a.budget,), generator=gen).tolist() for _ in range(n)]
    batches = micro_batches(training_rows(prompts, resp, seq, 0), {}, a.mbs)
    times = []
    for _ in range(2):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(run.model, run.optimizer, run.scheduler, [iter(batches)], num_microbatches=len(batches),
                   seq_length=seq, micro_batch_size=a.mbs, device=run.info.device)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"tokens_per_s": n * seq / times[-1], "step_s": times[-1]}


if __name__ == "__main__":
    sys.exit(main())
