"""Multimodal training stages: ViT + adapter + BlueLM decoder on image-text data.

    python tools/preprocess_data.py --multimodal --input megatron_bluelm/assets/images/captions.jsonl \\
        --output-prefix outputs/mm/demo --tokenizer-model megatron_bluelm/assets/tokenizer/bluelm_demo_sp8k.model
    torchrun --nproc-per-node 4 -m megatron_bluelm.stages.multimodal --config examples/mm_stage1_tiny.yaml \\
        --pretrained outputs/pretrain_tiny/ckpt --parallel.tp 2 --parallel.pp 2

The BlueLM-2.5-3B recipe is text pretraining, then multimodal stages that differ in what is trained
(``vision.freeze``): stage 1 trains the adapter only (ViT and decoder frozen), stage 2 everything.
``--pretrained`` starts from a checkpoint's weights (optimizer and step start fresh): a *text*
checkpoint initializes the decoder (the ViT and adapter keep their init), a multimodal one the whole
model. ``checkpoint.load`` resumes the same stage; when it points at a text checkpoint it is taken as
``--pretrained`` instead (nothing to resume). docs/MULTIMODAL.md has the details.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.schema import RunConfig


def multimodal_config(cfg: RunConfig) -> RunConfig:
    """Resolve the vision preset, check what the multimodal model supports, choose the PP split."""
    from megatron_bluelm.config.presets import apply_preset
    from megatron_bluelm.models.multimodal import resolve_vision_layout

    if not cfg.vision.enabled:
        raise ConfigError("vision.preset: the multimodal stage needs a vision preset (vit-tiny, vit-so400m)")
    apply_preset(cfg.model)
    resolve_vision_layout(cfg)
    if cfg.vision.pack:  # several records per row: positions and attention per record
        cfg.data.reset_position_ids = True
        cfg.data.reset_attention_mask = True
        v, mbs = cfg.vision, cfg.training.micro_batch_size
        largest = v.max_tiles + int(v.thumbnail)
        if v.max_tiles_per_microbatch is not None and v.max_tiles_per_microbatch // mbs < largest:
            raise ConfigError(f"vision.max_tiles_per_microbatch ({v.max_tiles_per_microbatch}) must allow one "
                              f"image of vision.max_tiles + thumbnail ({largest}) tiles in each of the "
                              f"training.micro_batch_size ({mbs}) rows")
    elif cfg.data.mixture:
        raise ConfigError("data.mixture: a multimodal mixture (image-text and text sources) is packed: set "
                          "vision.pack: true")
    return cfg


def train_flops_per_token(cfg: RunConfig, vocab: int) -> float:
    """Decoder FLOPs per token plus the ViT + adapter's share (3 x forward, ``max_tiles`` + thumbnail
    tiles per sequence assumed: an upper bound when the images are smaller)."""
    from megatron_bluelm.models import counting
    from megatron_bluelm.models.multimodal import vision_flops_per_tile

    v = cfg.vision
    decoder = counting.train_flops_per_token(counting.DecoderShape.from_model_config(cfg.model, vocab),
                                             cfg.data.seq_length)
    tiles = v.max_tiles + int(v.thumbnail)
    return decoder + 3.0 * tiles * vision_flops_per_tile(v) / cfg.data.seq_length


def packed_flops_per_position(cfg: RunConfig, vocab: int, stats) -> float:
    """Packed rows: the useful model FLOPs of the average row (record tokens only, each record attending
    to itself: 6 P T + 12 L d sum len^2, plus 3 x (ViT + adapter) per tile) per row position, so that
    the loop's positions x this = useful FLOPs, and the logged MFU counts no padding."""
    from megatron_bluelm.models import counting
    from megatron_bluelm.models.multimodal import adapter_flops_per_tile, vision_flops_per_tile

    d = counting.DecoderShape.from_model_config(cfg.model, vocab)
    matmul = d.num_layers * counting.layer_matmul_params(d) + d.vocab_size * d.hidden_size
    attention = 12.0 * d.num_layers * d.num_attention_heads * d.head_dim * stats.sum_len_sq
    per_tile = vision_flops_per_tile(cfg.vision) + adapter_flops_per_tile(cfg.vision, d.hidden_size)
    useful = 6.0 * matmul * stats.tokens + attention + 3.0 * stats.tiles * per_tile
    return useful / max(stats.rows, 1) / cfg.data.seq_length


def _is_text_checkpoint(root: str) -> bool:
    from megatron_bluelm.training.checkpointing import read_meta, resolve_checkpoint

    path, _ = resolve_checkpoint(root)
    if path is None:
        return False
    return read_meta(path)["config"].get("vision", {}).get("preset", "none") == "none"


def load_pretrained(run, root: str) -> str:
    """Weights of a text checkpoint into the decoder, or of a multimodal one into everything."""
    from megatron.core import dist_checkpointing

    from megatron_bluelm.inference.loading import checkpoint_dir, load_weights
    from megatron_bluelm.training.checkpointing import SHARDED_METADATA, check_shapes

    if not _is_text_checkpoint(root):
        path = load_weights(run.model, root)
    else:
        path = checkpoint_dir(root)
        lms = [getattr(chunk, "module", chunk).language_model for chunk in run.model]
        sharded = {f"model{i}": lm.sharded_state_dict(metadata=SHARDED_METADATA) for i, lm in enumerate(lms)}
        check_shapes(sharded, path)
        state = dist_checkpointing.load(sharded, path)
        for i, lm in enumerate(lms):
            lm.load_state_dict(state[f"model{i}"], strict=True)
    run.optimizer.reload_model_params()  # the optimizer's main copies follow the loaded weights
    run.logger.print(f"loaded {'decoder' if _is_text_checkpoint(root) else 'model'} weights from '{path}'")
    return path


def run_multimodal(cfg: RunConfig, pretrained: Optional[str] = None, collect: Optional[Callable] = None) -> dict:
    """Validate, build, (load weights,) train; returns the run summary on every rank."""
    from megatron_bluelm.data.multimodal_dataset import collate
    from megatron_bluelm.stages.runner import StageParts, run_training_stage

    cfg = multimodal_config(cfg)
    if cfg.checkpoint.load and _is_text_checkpoint(cfg.checkpoint.load):
        pretrained, cfg.checkpoint.load = pretrained or cfg.checkpoint.load, None
    parts = StageParts(build_chunk=_build_chunk, flops_per_token=train_flops_per_token, datasets=_datasets,
                       collate_fn=collate, before_train=_describe_split, num_samples=_num_samples)
    initial = (lambda run: load_pretrained(run, pretrained)) if pretrained else None
    return run_training_stage(cfg, parts, collect, initial_weights=initial)


def _build_chunk(cfg: RunConfig, vocab: int, tokenizer):
    from megatron_bluelm.models.multimodal import build_vlm

    return partial(build_vlm, cfg, vocab, tokenizer.special_ids["<image>"])


def _describe_split(run) -> None:
    from megatron_bluelm.models.multimodal import describe_split

    if run.cfg.parallel.pp > 1:
        run.logger.print(describe_split(run.cfg, run.cfg.parallel.first_stage_layers or 0))


def _num_samples(cfg: RunConfig) -> tuple[int, int, int]:
    # Validation samples only when periodic evaluation is on, and no test split: the image-text datasets
    # are built per split from the records, and an empty split asked for samples is an error there.
    t = cfg.training
    evals = (t.train_steps // t.eval_interval + 1) if t.eval_interval else 0
    return t.train_steps * t.global_batch_size, evals * t.eval_steps * t.global_batch_size, 0


def _datasets(run, tokenizer, num_samples):
    from megatron.core import parallel_state

    from megatron_bluelm.data.mm_packing import build_packed_multimodal_datasets
    from megatron_bluelm.data.multimodal_dataset import build_multimodal_datasets

    cfg = run.cfg
    build = build_packed_multimodal_datasets if cfg.vision.pack else build_multimodal_datasets
    train_ds, valid_ds, _ = build(cfg, tokenizer, num_samples=num_samples, seed=cfg.training.seed,
                                  with_pixels=parallel_state.is_pipeline_first_stage(ignore_virtual=True))
    if cfg.vision.pack:
        st = train_ds.stats
        run.flops_per_token = packed_flops_per_position(cfg, cfg.model.vocab_size or tokenizer.vocab_size, st)
        run.logger.print(f"packed rows: {st.records} records in {st.rows} rows, "
                         f"{st.padding_fraction(cfg.data.seq_length + 1):.1%} padding, "
                         f"{st.tiles / max(st.rows, 1):.2f} tiles per row")
    return train_ds, valid_ds or None


def early_check(cfg: RunConfig, world_size: int) -> None:
    """What can be checked before torch loads: the multimodal stage chooses the pipeline split itself
    (models/multimodal.py), so the full validation runs after that, in :func:`run_multimodal`."""
    from megatron_bluelm.config.validate import check_launch

    check_launch(cfg, world_size)
    if not cfg.vision.enabled:
        raise ConfigError("vision.preset: the multimodal stage needs a vision preset (vit-tiny, vit-so400m)")
    cfg.vision.resolve()
    cfg.vision.check(cfg.parallel.tp)
    cfg.data.validate()


def main(argv: Optional[Sequence[str]] = None) -> None:
    from megatron_bluelm.config.cli import run_stage_cli

    def add_arguments(ap):
        ap.add_argument("--pretrained", default=None, help="text or multimodal checkpoint to start from")

    run_stage_cli(__doc__, lambda cfg, args: run_multimodal(cfg, args.pretrained), argv, check=early_check,
                  add_arguments=add_arguments)


if __name__ == "__main__":
    main()
