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

from megatron_bluelm.config.schema import RunConfig


def run_pretrain(cfg: RunConfig, collect: Optional[Callable] = None) -> dict:
    """Validate, build, train; returns the run summary (losses per step) on every rank.

    ``collect(run)``, if given, runs after training (before teardown); its result is returned under
    ``"collected"`` (tests use it to gather the trained parameters)."""
    from megatron_bluelm.stages.runner import run_training_stage

    return run_training_stage(cfg, text_stage_parts(_pretrain_datasets), collect)


def text_stage_parts(datasets: Callable, **kw):
    """The decoder-only stages' parts (pretrain, SFT): the BlueLM decoder and its FLOPs; ``datasets``."""
    from megatron_bluelm.stages.runner import StageParts

    def build_chunk(cfg, vocab, tokenizer):
        from megatron_bluelm.models.decoder import build_decoder

        return partial(build_decoder, cfg, vocab)

    def flops(cfg, vocab):
        from megatron_bluelm.models.counting import DecoderShape, train_flops_per_token

        return train_flops_per_token(DecoderShape.from_model_config(cfg.model, vocab), cfg.data.seq_length)

    return StageParts(build_chunk=build_chunk, flops_per_token=flops, datasets=datasets, **kw)


def _pretrain_datasets(run, tokenizer, num_samples):
    from megatron_bluelm.data import build_pretrain_datasets

    cfg = run.cfg
    train_ds, valid_ds, _ = build_pretrain_datasets(cfg.data, tokenizer, seq_length=cfg.data.seq_length,
                                                    num_samples=num_samples, seed=cfg.training.seed)
    return train_ds, valid_ds


def main(argv: Optional[Sequence[str]] = None) -> None:
    from megatron_bluelm.config.cli import run_stage_cli

    run_stage_cli(__doc__, lambda cfg, args: run_pretrain(cfg), argv)


if __name__ == "__main__":
    main()
