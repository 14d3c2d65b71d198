"""Load model weights (only) from a training checkpoint into an inference or fine-tuning model.

Checkpoints are megatron-core ``dist_checkpointing`` directories written by
``training/checkpointing.py``: tensors are stored by global name and shape, so a model of any TP x PP
layout loads them. Optimizer and RNG state are not read. ``meta.json`` holds the run config that
trained the weights; :func:`checkpoint_run_config` rebuilds the model shape from it.
"""
from __future__ import annotations

import hashlib
import os

from megatron_bluelm.config.loader import _apply_mapping
from megatron_bluelm.config.schema import RunConfig
from megatron_bluelm.inference.errors import GenerationError


def checkpoint_dir(root: str) -> str:
    from megatron_bluelm.training.checkpointing import resolve_checkpoint

    path, _ = resolve_checkpoint(root)
    if path is None:
        raise GenerationError(f"checkpoint '{root}' holds no complete checkpoint (no 'latest' file)")
    return path


def checkpoint_run_config(root: str) -> RunConfig:
    """The RunConfig saved with the checkpoint (model shape, tokenizer path, context length)."""
    from megatron_bluelm.training.checkpointing import read_meta

    meta = read_meta(checkpoint_dir(root))
    cfg = RunConfig()
    _apply_mapping(cfg, meta["config"], "")
    return cfg


def _sha(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def check_tokenizer(ckpt_cfg: RunConfig, tokenizer, root: str) -> None:
    """The tokenizer must be the one the checkpoint was trained with: same vocabulary size, and the
    same file content when the training run's tokenizer file is still on this machine."""
    trained_vocab = ckpt_cfg.model.vocab_size
    if trained_vocab is not None and trained_vocab != tokenizer.vocab_size:
        raise GenerationError(f"tokenizer '{tokenizer.model_path}' has {tokenizer.vocab_size} tokens; checkpoint "
                              f"'{root}' was trained with model.vocab_size {trained_vocab}")
    trained = ckpt_cfg.data.tokenizer_model
    sha = _sha(trained)
    if sha is not None and sha != tokenizer.unique_identifiers["sha256"]:
        raise GenerationError(f"tokenizer '{tokenizer.model_path}' differs from the one checkpoint '{root}' was "
                              f"trained with ('{trained}'); pass --tokenizer-model {trained}")


def load_weights(chunks, root: str) -> str:
    """Load the model tensors of checkpoint ``root`` (a save directory or one iter_* directory) into
    this rank's model chunks. Every rank calls it. Returns the iteration directory loaded."""
    from megatron.core import dist_checkpointing

    from megatron_bluelm.training.checkpointing import (
        check_shapes,
        model_sharded_state_dict,
        verify_files,
    )

    path = checkpoint_dir(root)
    verify_files(path)  # a damaged file is named (megatron-core's and torch's errors name none)
    sharded = model_sharded_state_dict(chunks)
    try:
        check_shapes(sharded, path)
    except Exception as e:  # a shape mismatch is almost always another model or another tokenizer
        raise GenerationError(f"{e} (does the tokenizer / model config match the checkpoint?)") from e
    state = dist_checkpointing.load(sharded, path)
    for i, chunk in enumerate(chunks):
        getattr(chunk, "module", chunk).load_state_dict(state[f"model{i}"], strict=True)
    return path
