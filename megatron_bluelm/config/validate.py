"""Checks that run before any heavy work: every failure names the field(s) at fault."""
from __future__ import annotations

import dataclasses
import typing

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.presets import apply_preset
from megatron_bluelm.config.schema import RunConfig


def _get(cfg, dotted):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_choices(cfg: RunConfig) -> None:
    """Fields typed ``Literal[...]`` hold one of its values (the loader checks the same when it parses;
    this catches values set in code)."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            tp = hints[f.name]
            if typing.get_origin(tp) is typing.Literal:
                value = getattr(obj, f.name)
                _require(value in typing.get_args(tp),
                         f"{section.name}.{f.name}: {value!r} is not one of {list(typing.get_args(tp))}")


def _check_positive(cfg: RunConfig) -> None:
    for key in (
        "parallel.tp", "parallel.pp", "parallel.cp", "training.micro_batch_size",
        "training.global_batch_size", "training.train_steps", "data.seq_length",
        "model.num_layers", "model.hidden_size", "model.ffn_hidden_size",
        "model.num_attention_heads", "model.num_query_groups",
    ):
        value = _get(cfg, key)
        _require(isinstance(value, int) and value > 0, f"{key}: must be a positive integer, got {value!r}")


def _check_model(cfg: RunConfig) -> None:
    m, tp = cfg.model, cfg.parallel.tp
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads "
             f"({m.num_attention_heads})")
    _require(m.num_attention_heads % m.num_query_groups == 0,
             f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
             f"model.num_query_groups ({m.num_query_groups})")
    _require(m.num_attention_heads % tp == 0,
             f"model.num_attention_heads ({m.num_attention_heads}) is not divisible by "
             f"parallel.tp ({tp})")
    _require(m.num_query_groups % tp == 0,
             f"model.num_query_groups ({m.num_query_groups}) is not divisible by parallel.tp ({tp})")
    _require(m.ffn_hidden_size % tp == 0,
             f"model.ffn_hidden_size ({m.ffn_hidden_size}) is not divisible by parallel.tp ({tp})")
    _require(m.vocab_size is None or m.vocab_size > 0, f"model.vocab_size: must be positive, got {m.vocab_size}")


def pipeline_layer_split(cfg: RunConfig) -> list[int]:
    """Decoder layers per pipeline stage (before virtual-stage interleaving)."""
    p, layers = cfg.parallel, cfg.model.num_layers
    first, last = p.first_stage_layers, p.last_stage_layers
    if p.pp == 1:
        _require(first is None and last is None,
                 "parallel.first_stage_layers / last_stage_layers need parallel.pp > 1")
        return [layers]
    fixed = [x for x in (first, last) if x is not None]
    middle_stages = p.pp - len(fixed)
    rest = layers - sum(fixed)
    _require(all(x >= 0 for x in fixed) and rest >= 0,
             f"parallel.first_stage_layers/last_stage_layers ({first}, {last}) exceed model.num_layers "
             f"({layers})")
    if middle_stages == 0:
        _require(rest == 0, f"parallel.first_stage_layers + last_stage_layers must equal model.num_layers ({layers})")
        _check_no_empty_stage([first, last], cfg)
        return [first, last]
    _require(rest % middle_stages == 0,
             f"model.num_layers ({layers}) is not divisible by parallel.pp ({p.pp})"
             if not fixed else
             f"model.num_layers ({layers}) minus first/last stage layers ({rest} left) is not divisible by "
             f"the {middle_stages} remaining pipeline stages; set parallel.first_stage_layers / "
             f"parallel.last_stage_layers so it is")
    per = rest // middle_stages
    split = [per] * p.pp
    if first is not None:
        split[0] = first
    if last is not None:
        split[-1] = last
    _check_no_empty_stage(split, cfg)
    return split


def _check_no_empty_stage(split: list[int], cfg: RunConfig) -> None:
    """megatron-core builds no decoder block for a stage without layers (it fails after the process
    groups are up), so every pipeline stage needs at least one."""
    empty = [i for i, n in enumerate(split) if n < 1]
    if empty:
        p = cfg.parallel
        raise ConfigError(f"pipeline stage(s) {empty} would hold no decoder layer (split {split} of model.num_layers "
                          f"{cfg.model.num_layers} over parallel.pp {p.pp}, first_stage_layers "
                          f"{p.first_stage_layers}, last_stage_layers {p.last_stage_layers}): every stage needs "
                          f">= 1 layer")


def _check_world_size(cfg: RunConfig, world_size: int) -> int:
    p = cfg.parallel
    model_parallel = p.tp * p.pp * p.cp
    _require(world_size % model_parallel == 0,
             f"world size ({world_size}) is not divisible by parallel.tp x parallel.pp x parallel.cp "
             f"({p.tp} x {p.pp} x {p.cp} = {model_parallel}): launch a multiple of {model_parallel} processes, "
             f"e.g. `torchrun --nproc-per-node {model_parallel} -m megatron_bluelm.stages.<stage> ...`, "
             f"or choose sizes whose product divides {world_size}, e.g. --parallel.tp 1 --parallel.pp 1")
    return world_size // model_parallel


def _check_parallel(cfg: RunConfig, world_size: int) -> int:
    p, t = cfg.parallel, cfg.training
    dp = _check_world_size(cfg, world_size)
    split = pipeline_layer_split(cfg)
    if p.vpp is not None:
        _require(p.pp > 1 and p.vpp >= 2, "parallel.vpp (virtual stages) needs parallel.pp > 1 and vpp >= 2")
        _require(p.first_stage_layers is None and p.last_stage_layers is None,
                 "parallel.vpp cannot be combined with first_stage_layers / last_stage_layers")
        _require(split[0] % p.vpp == 0,
                 f"layers per pipeline stage ({split[0]}) is not divisible by parallel.vpp ({p.vpp})")
    _require(not p.sequence_parallel or p.tp > 1, "parallel.sequence_parallel needs parallel.tp > 1")
    _require(cfg.data.seq_length % p.tp == 0 or not p.sequence_parallel,
             f"data.seq_length ({cfg.data.seq_length}) must be divisible by parallel.tp ({p.tp}) "
             f"with sequence_parallel")
    _require(not p.overlap_param_gather or p.distributed_optimizer,
             "parallel.overlap_param_gather needs parallel.distributed_optimizer")
    _require(p.cp == 1, "parallel.cp > 1 needs Transformer Engine attention, which this build does not use")
    per_step = t.micro_batch_size * dp
    _require(t.global_batch_size % per_step == 0,
             f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
             f"training.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp} = {per_step})")
    if p.vpp is not None:
        n_micro = t.global_batch_size // per_step
        _require(n_micro % p.pp == 0,
                 f"interleaved pipeline needs micro-batches per step ({n_micro}) divisible by parallel.pp ({p.pp})")
    return dp


def _check_schedule(cfg: RunConfig) -> None:
    s, o, t = cfg.schedule, cfg.optimizer, cfg.training
    _require(0 <= s.warmup_steps <= t.train_steps,
             f"schedule.warmup_steps ({s.warmup_steps}) must be in [0, training.train_steps={t.train_steps}]")
    _require(0 <= o.min_lr <= o.lr, f"optimizer.min_lr ({o.min_lr}) must be in [0, optimizer.lr={o.lr}]")
    if s.style == "wsd":
        _require(s.wsd_decay_steps is not None and s.wsd_decay_steps > 0,
                 "schedule.wsd_decay_steps: required (> 0) with schedule.style: wsd")
    _require(cfg.logging.log_interval > 0, "logging.log_interval: must be > 0")
    _require(t.eval_interval >= 0, "training.eval_interval: must be >= 0")
    need = t.train_steps * t.global_batch_size
    _require(t.train_samples is None or t.train_samples >= need,
             f"training.train_samples ({t.train_samples}) is less than training.train_steps x "
             f"training.global_batch_size ({t.train_steps} x {t.global_batch_size} = {need})")
    _require(t.max_skipped_steps >= 0, f"training.max_skipped_steps: must be >= 0, got {t.max_skipped_steps}")


def _check_checkpoint(cfg: RunConfig) -> None:
    c = cfg.checkpoint
    _require(not (c.host_buffers == "per_save" and c.host_buffers_at != "start"),
             f"checkpoint.host_buffers_at: {c.host_buffers_at!r} applies to the run's own host buffers "
             f"(checkpoint.host_buffers pinned or pageable), not to checkpoint.host_buffers: per_save")


def check_launch(cfg: RunConfig, world_size: int) -> int:
    """The subset of :func:`validate` that holds before a stage adjusts the config (e.g. the multimodal
    stage choosing the pipeline split): choices, preset, positive sizes, world size. Returns dp."""
    _check_choices(cfg)
    apply_preset(cfg.model)
    _check_positive(cfg)
    return _check_world_size(cfg, world_size)


def validate(cfg: RunConfig, world_size: int) -> int:
    """Resolve the model preset, check everything, return the data-parallel size."""
    _check_choices(cfg)
    apply_preset(cfg.model)
    _check_positive(cfg)
    _check_model(cfg)
    dp = _check_parallel(cfg, world_size)
    _check_schedule(cfg)
    _check_checkpoint(cfg)
    if hasattr(cfg.data, "validate"):
        cfg.data.validate()
    return dp
