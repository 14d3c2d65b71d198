"""The training loop shared by every stage: set up, step, log, evaluate, checkpoint.

Read top to bottom: ``setup_run`` builds everything a stage needs; ``train`` runs the steps.
A stage (``stages/pretrain.py``) supplies how to build a model chunk and the datasets.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bluelm.config.loader import to_dict
from megatron_bluelm.config.schema import RunConfig
from megatron_bluelm.config.validate import validate
from megatron_bluelm.parallel.setup import ParallelInfo, setup_parallel, world_size_from_env
from megatron_bluelm.training.logging import RunLogger, check_logging_backends, device_peak_tflops
from megatron_bluelm.training.model_setup import build_model_chunks, build_optimizer, wrap_ddp
from megatron_bluelm.training.step import StepResult, configure_model_hooks, eval_step, train_step


@dataclass
class Run:
    """Everything one training run holds; stages and checkpointing read and extend it."""

    cfg: RunConfig
    info: ParallelInfo
    model: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    logger: RunLogger
    flops_per_token: float
    step: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)
    skipped_steps: int = 0  # steps dropped for NaN/inf gradients (training.nan_policy skip)
    stage: str = ""  # recorded in checkpoints (a stage can tell its own checkpoints from another's)
    frozen_models: dict = field(default_factory=dict)  # name -> chunks saved and restored with the run (RL reference)

    @property
    def num_microbatches(self) -> int:
        t = self.cfg.training
        return t.global_batch_size // (t.micro_batch_size * self.info.dp)


def prepare_config(cfg: RunConfig) -> int:
    """All checks that need no process group; returns the data-parallel size."""
    dp = validate(cfg, world_size_from_env())
    check_logging_backends(cfg)
    return dp


def setup_run(cfg: RunConfig, build_chunk: Callable, flops_per_token: float) -> Run:
    p = cfg.parallel
    info = setup_parallel(p.tp, p.pp, p.vpp, p.cp, cfg.training.seed, p.dist_backend)
    chunks = build_model_chunks(cfg, build_chunk, info.device)
    model = wrap_ddp(cfg, chunks)
    optimizer, scheduler = build_optimizer(cfg, model)
    configure_model_hooks(model, optimizer)
    logger = RunLogger(cfg, enabled=info.is_logging_rank, run_config=to_dict(cfg))
    return Run(cfg, info, model, optimizer, scheduler, logger, flops_per_token)


def _memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


class Throughput:
    """Tokens/s, TFLOP/s per GPU and MFU over the steps since the last report.

    On CUDA the clock is CUDA events on the current stream, not host time taken after a
    ``synchronize``: ``pause()`` / ``resume()`` (around evaluation and the step-end hooks, i.e. checkpoint
    saves, at every step) record an event each and wait for nothing, and only ``report()`` (every
    ``logging.log_interval`` steps) waits for the device. A paused interval on the device runs from the
    step's last kernel to the first work queued after ``resume()``, what a synchronize at each end
    measured, so evaluation and saves are still not step time. A synchronize at every step end made
    the host wait for the optimizer's kernels before queuing the next step (a bubble a step)."""

    def __init__(self, run: Run):
        self.run = run
        self.peak = device_peak_tflops(run.cfg.logging.peak_tflops)
        self.cuda = torch.cuda.is_available()
        self.reset()

    def _event(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def reset(self) -> None:
        self.steps, self.paused_s, self.intervals, self._paused = 0, 0.0, [], None
        if self.cuda:
            self.start = self._event()
        self.t0 = time.perf_counter()

    def pause(self) -> None:
        """Stop the clock: evaluation and checkpoint saves are not step time."""
        self._paused = self._event() if self.cuda else time.perf_counter()

    def resume(self) -> None:
        if self._paused is None:
            return
        if self.cuda:
            self.intervals.append((self._paused, self._event()))
        else:
            self.paused_s += time.perf_counter() - self._paused
        self._paused = None

    def report(self) -> dict:
        if self.cuda:
            end = self._event()
            end.synchronize()
            paused = sum(a.elapsed_time(b) for a, b in self.intervals) / 1e3
            dt = max(self.start.elapsed_time(end) / 1e3 - paused, 1e-9)
        else:
            dt = max(time.perf_counter() - self.t0 - self.paused_s, 1e-9)
        t = self.run.cfg.training
        tokens = self.steps * t.global_batch_size * self.run.cfg.data.seq_length
        tflops_per_gpu = tokens * self.run.flops_per_token / dt / self.run.info.world_size / 1e12
        out = {"tokens_per_s": tokens / dt, "tokens_per_s_per_gpu": tokens / dt / self.run.info.world_size,
               "tflops_per_gpu": tflops_per_gpu, "step_time_s": dt / max(self.steps, 1)}
        if self.peak:
            out["mfu"] = tflops_per_gpu / self.peak
        self.reset()
        return out


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _format(step: int, total: int, metrics: dict, elapsed: Optional[float] = None,
            eta: Optional[float] = None) -> str:
    parts = [f"step {step:>6}/{total}"]
    if elapsed is not None:  # wall time of this run so far, and the remaining steps at its mean pace
        parts.append(f"elapsed {_clock(elapsed)}" + ("" if eta is None else f" eta {_clock(eta)}"))
    per_gpu = (("tflops_per_gpu", "{:.1f}"), ("mfu", "{:.1%}"), ("mem_gib", "{:.1f}"))
    for key, fmt in (("loss", "{:.4f}"), ("grad_norm", "{:.3f}"), ("lr", "{:.3e}"),
                     ("tokens_per_s", "{:,.0f}"), *(per_gpu if torch.cuda.is_available() else ())):
        if metrics.get(key) is not None:
            parts.append(f"{key.replace('_per_', '/')} " + fmt.format(metrics[key]))
    return " | ".join(parts)


def _evaluate(run: Run, make_valid_iterators: Optional[Callable]) -> Optional[float]:
    if make_valid_iterators is None or run.cfg.training.eval_steps == 0:
        return None
    t = run.cfg.training
    iterators = make_valid_iterators(0)  # the same validation samples at every evaluation
    total, tokens = 0.0, 0
    for _ in range(t.eval_steps):
        res = eval_step(run.model, iterators, num_microbatches=run.num_microbatches,
                        seq_length=run.cfg.data.seq_length, micro_batch_size=t.micro_batch_size,
                        device=run.info.device)
        if res.loss is not None:
            total += res.loss * res.tokens
            tokens += res.tokens
    return total / tokens if tokens else None


def train(run: Run, make_train_iterators: Callable, make_valid_iterators: Optional[Callable] = None,
          on_step_end: Optional[Callable[[Run], None]] = None,
          on_eval: Optional[Callable[[Run], dict]] = None,
          step_fn: Optional[Callable[[Run, list], StepResult]] = None) -> Run:
    """Run ``cfg.training.train_steps`` optimizer steps from ``run.step``.

    ``make_*_iterators(consumed_samples)`` return one data iterator per model chunk, positioned at
    ``consumed_samples`` of the global sample stream (exact resume). ``on_eval(run)`` runs at every
    evaluation on every rank (benchmark generation, eval/periodic.py) and returns metrics logged as split ``eval``.
    ``step_fn(run, iterators)`` replaces the language-model step (the RL stage's rollout + policy
    updates); its ``StepResult.metrics`` are logged with the step."""
    cfg, t = run.cfg, run.cfg.training
    iterators = make_train_iterators(run.consumed_samples)
    meter = Throughput(run)
    started, first_step = time.perf_counter(), run.step
    run.logger.print(f"training: {t.train_steps - run.step} steps, {run.num_microbatches} micro-batches of "
                     f"{t.micro_batch_size} x {cfg.data.seq_length} per step and data-parallel rank "
                     f"(TP{run.info.tp} PP{run.info.pp} DP{run.info.dp})")
    while run.step < t.train_steps:
        res: StepResult = step_fn(run, iterators) if step_fn is not None else train_step(
            run.model, run.optimizer, run.scheduler, iterators, num_microbatches=run.num_microbatches,
            seq_length=cfg.data.seq_length, micro_batch_size=t.micro_batch_size, device=run.info.device)
        run.step += 1
        run.consumed_samples += t.global_batch_size
        meter.steps += 1
        _check_finite(run, res, agreed=step_fn is None)
        record = {"loss": res.loss, "grad_norm": _num(res.grad_norm), "lr": run.scheduler.get_lr(
            run.optimizer.param_groups[0]), **res.metrics}
        if t.nan_policy == "skip":
            record["skipped_steps"] = run.skipped_steps
        run.history.append(record)
        if run.step % cfg.logging.log_interval == 0 or run.step == t.train_steps:
            record.update(meter.report())
            if torch.cuda.is_available():
                record["mem_gib"] = _memory_gib()
            run.logger.log(run.step, record)
            elapsed = time.perf_counter() - started
            eta = elapsed / (run.step - first_step) * (t.train_steps - run.step)
            run.logger.print(_format(run.step, t.train_steps, record, elapsed, eta))
        meter.pause()
        if t.eval_interval and (run.step % t.eval_interval == 0 or run.step == t.train_steps):
            val = _evaluate(run, make_valid_iterators)
            if val is not None:
                run.logger.log(run.step, {"loss": val, "ppl": math.exp(min(val, 50))}, prefix="valid")
                run.logger.print(f"step {run.step:>6}/{t.train_steps} | valid loss {val:.4f}")
            if on_eval is not None:
                scores = on_eval(run)
                run.logger.log(run.step, scores, prefix="eval")
                run.logger.print(f"step {run.step:>6}/{t.train_steps} | eval " + ", ".join(
                    f"{k.rsplit('/', 1)[0]} {v:.3f}" for k, v in scores.items() if k.endswith("/accuracy")))
        if on_step_end is not None:
            on_step_end(run)
        meter.resume()
    return run


def _num(x) -> Optional[float]:
    return None if x is None else float(x)


class NonFiniteStep(FloatingPointError):
    """A step's gradients or loss were NaN/inf under ``training.nan_policy: stop`` (or too many were
    skipped): the run ends; that step was not saved."""


def _check_finite(run: Run, res: StepResult, agreed: bool = False) -> None:
    """Apply ``training.nan_policy`` to the step just taken. A step with NaN/inf gradients was not
    applied (``training/model_setup.skip_nonfinite_steps``; every rank saw the same global norm);
    the loss exists on the last pipeline stage only, so with pipeline stages its check is
    all-reduced. ``agreed``: the step is ``train_step``'s, whose loss is the global one on every rank
    that has it; without pipeline stages every rank then already holds the same two facts, and the
    check reads nothing from the device (an all-reduce here would make the host wait for the
    optimizer's kernels before it queues the next step)."""
    t = run.cfg.training
    loss_bad = res.loss is not None and not math.isfinite(res.loss)
    grads_bad = bool(res.skipped)
    if not (agreed and parallel_state.get_pipeline_model_parallel_world_size() == 1):
        flags = torch.tensor([float(loss_bad), float(grads_bad)], device=run.info.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_bad, grads_bad = (bool(x > 0) for x in flags.tolist())
    if not (loss_bad or grads_bad):
        return
    what = " and ".join(([f"gradient norm {_num(res.grad_norm)}"] if grads_bad else [])
                        + (["loss not finite"] if loss_bad else []))
    applied = "was not applied" if grads_bad else "was applied (its gradients were finite)"
    if t.nan_policy == "skip":
        run.skipped_steps += 1
        run.logger.print(f"step {run.step}: {what}; the update {applied} (nan_policy skip: "
                         f"{run.skipped_steps} skipped so far)")
        if run.skipped_steps <= t.max_skipped_steps:
            return
        raise NonFiniteStep(f"step {run.step}: {run.skipped_steps} steps with NaN/inf gradients or loss, more "
                            f"than training.max_skipped_steps ({t.max_skipped_steps}); stopping")
    raise NonFiniteStep(f"step {run.step}: {what}; the update {applied} and this step is not saved (the "
                        f"last checkpoint stays as it is); stopping. training.nan_policy: skip drops such "
                        f"steps and goes on")


def sample_counts(cfg: RunConfig) -> tuple[int, int, int]:
    """(train, valid, test) samples the datasets must hold for this run's steps and evaluations."""
    t = cfg.training
    evals = (t.train_steps // t.eval_interval + 1) if t.eval_interval else 0
    # training.train_samples, when set (or adopted from a resumed checkpoint), fixes the size megatron-core
    # shuffles for, so the data order does not depend on train_steps (docs/CHECKPOINTS.md).
    train = max(t.train_steps * t.global_batch_size, t.train_samples or 0)
    return (train, max(evals, 1) * t.eval_steps * t.global_batch_size,
            t.eval_steps * t.global_batch_size)


def data_iterators(cfg: RunConfig, dataset, consumed_samples: int, **loader_kwargs) -> list:
    """One iterator per model chunk over this data-parallel rank's share, from ``consumed_samples``."""
    from megatron.core import parallel_state

    from megatron_bluelm.data import build_data_iterator

    return [build_data_iterator(dataset, micro_batch_size=cfg.training.micro_batch_size,
                                consumed_samples=consumed_samples,
                                dp_rank=parallel_state.get_data_parallel_rank(),
                                dp_size=parallel_state.get_data_parallel_world_size(), **loader_kwargs)
            for _ in range(cfg.parallel.vpp or 1)]


def run_stage(run: Run, body: Callable, collect: Optional[Callable] = None,
              initial_weights: Optional[Callable[[Run], None]] = None) -> dict:
    """What every stage does around its training: resume from ``checkpoint.load`` (or, on a fresh
    start, ``initial_weights(run)``), ``body(run, checkpointer)``, the final save, the summary (plus
    ``collect(run)``), then logger and process groups closed whatever happened. A preemption signal
    (SIGTERM / SIGUSR1) saves and ends the run cleanly."""
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training.checkpointing import Checkpointer, Preempted

    checkpointer = None
    try:
        checkpointer = Checkpointer(run)
        checkpointer.maybe_resume()
        run.logger.begin(run.step)  # metrics.jsonl and wandb continue a resumed run
        if initial_weights is not None and run.step == 0:  # a resumed run already holds its weights
            initial_weights(run)
        try:
            body(run, checkpointer)
        except Preempted as stop:
            run.logger.print(str(stop))
        except NonFiniteStep:
            checkpointer.wait_for_pending_save()  # an earlier (finite) step's async save completes
            raise
        checkpointer.finish()
        result = summary(run)
        if collect is not None:
            result["collected"] = collect(run)
        return result
    finally:
        if checkpointer is not None:
            checkpointer.close()
        run.logger.close()
        teardown()


def cli(main_body: Callable[[], object]) -> None:
    """Run a stage's command line: configuration errors print one line and exit with status 2."""
    import sys

    from megatron_bluelm.config.errors import ConfigError

    try:
        main_body()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


def summary(run: Run) -> dict:
    return {"step": run.step, "consumed_samples": run.consumed_samples,
            "losses": [h.get("loss") for h in run.history], "skipped_steps": run.skipped_steps,
            "parallel": dataclasses.asdict(run.info) | {"device": str(run.info.device)}}
