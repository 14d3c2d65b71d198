"""What the pretrain, SFT and multimodal stages share: one runner, called with what differs.

    run_training_stage(cfg, StageParts(build_chunk=..., flops_per_token=..., datasets=...), collect)

The runner checks the config (``training.loop.prepare_config``), loads the tokenizer and checks the
model's vocabulary against it (every stage: an embedding smaller than the tokenizer's ids is an error,
not an index error later), builds the run, then trains on the stage's datasets with the data loader
settings of ``data`` (``num_workers``) and the stage's ``collate_fn``. A stage supplies only its model,
its FLOPs count, its datasets and, optionally, what it does before training or to its first weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.schema import RunConfig


@dataclass
class StageParts:
    # (cfg, vocab_size, tokenizer) -> build_chunk(pre_process=, post_process=, vp_stage=) for setup_run
    build_chunk: Callable[[RunConfig, int, Any], Callable]
    flops_per_token: Callable[[RunConfig, int], float]  # training FLOPs per token, for MFU
    # (run, tokenizer, num_samples) -> (train, valid) datasets; valid may be None
    datasets: Callable[[Any, Any, tuple[int, int, int]], tuple]
    collate_fn: Optional[Callable] = None  # None: torch's default (stacks)
    before_train: Optional[Callable[[Any], None]] = None  # (run) -> None, e.g. print the pipeline split
    num_samples: Optional[Callable[[RunConfig], tuple[int, int, int]]] = None  # default: loop.sample_counts
    evaluator: Optional[Callable[[RunConfig, Any], Optional[Callable]]] = None  # (cfg, tokenizer) -> on_eval


def model_vocab_size(cfg: RunConfig, tokenizer) -> int:
    """``model.vocab_size``, or the tokenizer's when unset; never smaller than the tokenizer's ids."""
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}, data.tokenizer_model={cfg.data.tokenizer_model})")
    return vocab


def run_training_stage(cfg: RunConfig, parts: StageParts, collect: Optional[Callable] = None,
                       initial_weights: Optional[Callable] = None) -> dict:
    """Validate, build, (load initial weights,) train; returns the run summary on every rank."""
    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.training.loop import data_iterators, prepare_config, run_stage, sample_counts, setup_run, train

    prepare_config(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    vocab = model_vocab_size(cfg, tokenizer)
    on_eval = parts.evaluator(cfg, tokenizer) if parts.evaluator is not None else None
    run = setup_run(cfg, parts.build_chunk(cfg, vocab, tokenizer), parts.flops_per_token(cfg, vocab))

    def body(run, checkpointer):
        if parts.before_train is not None:
            parts.before_train(run)
        counts = (parts.num_samples or sample_counts)(cfg)
        train_ds, valid_ds = parts.datasets(run, tokenizer, counts)
        iterators = partial(data_iterators, cfg, num_workers=cfg.data.num_workers, collate_fn=parts.collate_fn)
        train(run, partial(iterators, train_ds), partial(iterators, valid_ds) if valid_ds is not None else None,
              on_step_end=checkpointer.on_step_end, on_eval=on_eval)

    return run_stage(run, body, collect, initial_weights=initial_weights)
