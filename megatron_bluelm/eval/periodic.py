"""Benchmark evaluation during training: every ``training.eval_interval`` steps, the training model
itself (its own parameter tensors, no copy) answers ``training.eval_benchmarks`` at each of
``training.eval_budgets`` through the generation engine; accuracy and mean thinking tokens per
benchmark and budget go to metrics.jsonl / TensorBoard / wandb as split ``eval``:

    {"step": 200, "split": "eval", "arithmetic/nothink/accuracy": 0.41, "arithmetic/16/accuracy": 0.63,
     "arithmetic/16/thinking_tokens": 15.2, ...}

Items are split over the data-parallel ranks (each replica answers its share) and the counts summed,
so every rank returns the same metrics. Greedy decoding, one sample per item.

    from megatron_bluelm.eval.periodic import PeriodicEval
    evaluator = PeriodicEval.from_config(cfg, tokenizer)      # None when no benchmarks are configured
    train(run, ..., on_eval=evaluator)                        # training/loop.py calls evaluator(run)
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.eval.benchmarks import Benchmark, load_benchmark
from megatron_bluelm.eval.harness import EvalSettings, budget_label, evaluate


class PeriodicEval:
    def __init__(self, benchmarks: list, settings: EvalSettings, tokenizer):
        self.benchmarks, self.settings, self.tok = benchmarks, settings, tokenizer

    @classmethod
    def from_config(cls, cfg, tokenizer) -> Optional["PeriodicEval"]:
        t = cfg.training
        if not t.eval_benchmarks:
            return None
        if not t.eval_interval:
            raise ConfigError("training.eval_benchmarks: set training.eval_interval > 0 to evaluate them")
        if cfg.parallel.vpp is not None or cfg.parallel.sequence_parallel:
            raise ConfigError("training.eval_benchmarks: generation runs on one model chunk without sequence "
                              "parallelism; unset parallel.vpp / parallel.sequence_parallel or the benchmarks")
        if any(b is not None and b + 1 >= cfg.data.seq_length for b in t.eval_budgets):
            raise ConfigError(f"training.eval_budgets {t.eval_budgets}: a budget must be < data.seq_length "
                              f"({cfg.data.seq_length})")
        benchmarks = [load_benchmark(spec, limit=t.eval_limit) for spec in t.eval_benchmarks]
        settings = EvalSettings(budgets=list(t.eval_budgets), max_new_tokens=t.eval_max_new_tokens,
                                answer_tokens=t.eval_answer_tokens, batch_size=t.eval_batch_size)
        settings.check()
        return cls(benchmarks, settings, tokenizer)

    def __call__(self, run) -> dict:
        from megatron.core import parallel_state as ps

        from megatron_bluelm.eval.generation import EngineGenerate
        from megatron_bluelm.inference.engine import TextGenerator
        from megatron_bluelm.inference.model import InferenceModel
        from megatron_bluelm.training.checkpointing import finish_param_gather

        finish_param_gather(run.model)  # the engine reads the parameters directly: no pending all-gather
        chunk = getattr(run.model[0], "module", run.model[0])
        was_training = chunk.training
        rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        shards = [Benchmark(b.name, b.path, b.items[rank::dp]) for b in self.benchmarks]
        shards = [b for b in shards if b.items]
        try:
            im = InferenceModel(chunk, run.cfg, run.info, self.tok.vocab_size)
            gen = EngineGenerate(TextGenerator(im, self.tok), self.settings)
            summary = evaluate(gen, shards, self.settings, progress=False) if shards else {"benchmarks": {}}
        finally:
            chunk.train(was_training)
        return self._reduce(summary, run.info.device)

    def _reduce(self, summary: dict, device) -> dict:
        """Sum (correct, samples, thinking tokens) per benchmark and budget over data-parallel ranks."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        keys = [(b.name, budget_label(budget)) for b in self.benchmarks for budget in self.settings.budgets]
        sums = torch.zeros(len(keys), 3, dtype=torch.float64)
        for i, (name, label) in enumerate(keys):
            s = summary["benchmarks"].get(name, {}).get("budgets", {}).get(label)
            if s is not None:
                sums[i] = torch.tensor([s["accuracy"] * s["items"], s["items"], s["mean_thinking_tokens"] * s["items"]])
        if ps.get_data_parallel_world_size() > 1:
            sums = sums.to(device)
            dist.all_reduce(sums, group=ps.get_data_parallel_group())
            sums = sums.cpu()
        out = {}
        for (name, label), (correct, n, thinking) in zip(keys, sums.tolist()):
            if n:
                out[f"{name}/{label}/accuracy"] = correct / n
                out[f"{name}/{label}/thinking_tokens"] = thinking / n
        return out

