"""Supervised fine-tuning (chat, thinking / non-thinking) of the BlueLM decoder.

    python tools/preprocess_data.py --chat --input chats.jsonl --output-prefix data/sft \\
        --tokenizer-model TOK.model --think-ratio 0.7 --budget-ratio 0.2
    torchrun --nproc-per-node 4 -m megatron_bluelm.stages.sft --config examples/sft_tiny.yaml \\
        --pretrained outputs/pretrain/ckpt --parallel.tp 2 --parallel.pp 2

The shared training loop (training/loop.py) with packed SFT rows (data/sft_packing.py): masked loss
on assistant tokens, positions restarting and attention blocked per sample. ``--pretrained`` loads the
model weights of a pretrain checkpoint (any layout; optimizer and step start fresh);
``checkpoint.save`` / ``checkpoint.load`` save and resume the SFT run itself, as in pretraining.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from megatron_bluelm.config.schema import RunConfig


def sft_config(cfg: RunConfig) -> RunConfig:
    """Packing needs per-sample positions and attention: both are switched on for SFT."""
    cfg.data.reset_position_ids = True
    cfg.data.reset_attention_mask = True
    return cfg


def _load_pretrained(run, path: str) -> None:
    from megatron_bluelm.inference.loading import load_weights

    loaded = load_weights(run.model, path)
    run.optimizer.reload_model_params()  # the optimizer's main copies follow the loaded weights
    run.logger.print(f"loaded pretrained weights from '{loaded}'")


def run_sft(cfg: RunConfig, pretrained: Optional[str] = None, collect: Optional[Callable] = None) -> dict:
    """Validate, build, (load pretrained weights,) train; returns the run summary on every rank."""
    from megatron_bluelm.stages.pretrain import text_stage_parts
    from megatron_bluelm.stages.runner import run_training_stage

    def evaluator(cfg, tokenizer):
        from megatron_bluelm.eval.periodic import PeriodicEval

        return PeriodicEval.from_config(cfg, tokenizer)  # training.eval_benchmarks: generation + graders

    initial = (lambda run: _load_pretrained(run, pretrained)) if pretrained else None
    return run_training_stage(sft_config(cfg), text_stage_parts(_sft_datasets, evaluator=evaluator), collect,
                              initial_weights=initial)


def _sft_datasets(run, tokenizer, num_samples):
    from megatron_bluelm.data.sft_packing import build_sft_datasets

    cfg = run.cfg
    train_ds, valid_ds, _ = build_sft_datasets(cfg.data, tokenizer, seq_length=cfg.data.seq_length,
                                               num_samples=num_samples, seed=cfg.training.seed)
    return train_ds, valid_ds or None


def main(argv: Optional[Sequence[str]] = None) -> None:
    from megatron_bluelm.config.cli import run_stage_cli

    def add_arguments(ap):
        ap.add_argument("--pretrained", default=None, help="pretrain checkpoint directory to start from")

    run_stage_cli(__doc__, lambda cfg, args: run_sft(cfg, args.pretrained), argv, add_arguments=add_arguments)


if __name__ == "__main__":
    main()
