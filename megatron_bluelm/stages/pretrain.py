"""Text pretraining of the BlueLM decoder.

    torchrun --nproc-per-node 4 -m megatron_bluelm.stages.pretrain --config examples/pretrain_tiny.yaml \\
        --parallel.tp 2 --parallel.pp 2

Any config field can be overridden with ``--section.field VALUE``; see ``megatron_bluelm/config/schema.py``.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Callable, Optional, Sequence

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.loader import load_config
from megatron_bluelm.config.schema import RunConfig


def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML recipe (examples/*.yaml)")
    args, overrides = ap.parse_known_args(argv)
    return load_config(args.config, overrides)


def run_pretrain(cfg: RunConfig, collect: Optional[Callable] = None) -> dict:
    """Validate, build, train; returns the run summary (losses per step) on every rank.

    ``collect(run)``, if given, runs after training (before teardown); its result is returned under
    ``"collected"`` (tests use it to gather the trained parameters)."""
    from megatron_bluelm.data import build_data_iterator, build_pretrain_datasets, load_tokenizer
    from megatron_bluelm.models.counting import DecoderShape, train_flops_per_token
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training.checkpointing import Checkpointer, Preempted
    from megatron_bluelm.training.loop import prepare_config, setup_run, summary, train

    dp = prepare_config(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}, data.tokenizer_model={cfg.data.tokenizer_model})")
    flops = train_flops_per_token(DecoderShape.from_model_config(cfg.model, vocab), cfg.data.seq_length)
    run = setup_run(cfg, partial(build_decoder, cfg, vocab), flops)
    try:
        t = cfg.training
        evals = (t.train_steps // t.eval_interval + 1) if t.eval_interval else 0
        num_samples = (t.train_steps * t.global_batch_size, max(evals, 1) * t.eval_steps * t.global_batch_size,
                       t.eval_steps * t.global_batch_size)
        train_ds, valid_ds, _ = build_pretrain_datasets(cfg.data, tokenizer, seq_length=cfg.data.seq_length,
                                                        num_samples=num_samples, seed=t.seed)
        chunks = cfg.parallel.vpp or 1

        def iterators(dataset, consumed):
            return [build_data_iterator(dataset, micro_batch_size=t.micro_batch_size, consumed_samples=consumed,
                                        dp_rank=_dp_rank(), dp_size=dp) for _ in range(chunks)]

        checkpointer = Checkpointer(run)
        checkpointer.maybe_resume()
        try:
            train(run, partial(iterators, train_ds),
                  partial(iterators, valid_ds) if valid_ds is not None else None,
                  on_step_end=checkpointer.on_step_end)
        except Preempted as stop:  # saved at a preemption signal: leave cleanly
            run.logger.print(str(stop))
        checkpointer.finish()
        result = summary(run)
        if collect is not None:
            result["collected"] = collect(run)
        return result
    finally:
        run.logger.close()
        teardown()


def _dp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        cfg = parse_args(argv)
        run_pretrain(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
