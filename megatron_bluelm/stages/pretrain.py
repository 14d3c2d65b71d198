"""Text pretraining of the BlueLM decoder.

    torchrun --nproc-per-node 4 -m megatron_bluelm.stages.pretrain --config examples/pretrain_tiny.yaml \\
        --parallel.tp 2 --parallel.pp 2

Any config field can be overridden with ``--section.field VALUE``; ``--help`` lists every field and
``--print-config`` checks the config and prints it without training. This module imports nothing heavy
at the top: arguments and config are checked before torch and megatron-core load (config/cli.py).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.schema import RunConfig


def run_pretrain(cfg: RunConfig, collect: Optional[Callable] = None) -> dict:
    """Validate, build, train; returns the run summary (losses per step) on every rank.

    ``collect(run)``, if given, runs after training (before teardown); its result is returned under
    ``"collected"`` (tests use it to gather the trained parameters)."""
    from megatron_bluelm.data import build_pretrain_datasets, load_tokenizer
    from megatron_bluelm.models.counting import DecoderShape, train_flops_per_token
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.training.loop import data_iterators, prepare_config, run_stage, sample_counts, setup_run, train

    prepare_config(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}, data.tokenizer_model={cfg.data.tokenizer_model})")
    flops = train_flops_per_token(DecoderShape.from_model_config(cfg.model, vocab), cfg.data.seq_length)
    run = setup_run(cfg, partial(build_decoder, cfg, vocab), flops)

    def body(run, checkpointer):
        train_ds, valid_ds, _ = build_pretrain_datasets(cfg.data, tokenizer, seq_length=cfg.data.seq_length,
                                                        num_samples=sample_counts(cfg), seed=cfg.training.seed)
        train(run, partial(data_iterators, cfg, train_ds),
              partial(data_iterators, cfg, valid_ds) if valid_ds is not None else None,
              on_step_end=checkpointer.on_step_end)

    return run_stage(run, body, collect)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from megatron_bluelm.config.cli import run_stage_cli

    run_stage_cli(__doc__, lambda cfg, args: run_pretrain(cfg), argv)


if __name__ == "__main__":
    main()
