"""The two conversions: a megatron checkpoint (any layout) -> HF directory, and back.

    megatron_to_hf("outputs/run/ckpt", "outputs/hf")         # newest complete checkpoint
    hf_to_megatron("outputs/hf", "outputs/ckpt_from_hf")      # model-only, TP1 (loads into any layout)

Architectures are looked up in ``ARCHITECTURES`` (name -> mapping-table module). A module provides
``TABLE``, ``HF_ARCHITECTURE``, ``export_config(cfg, vocab_size, dtype, special_ids)`` and
``import_config(hf_config) -> RunConfig``. A checkpoint's architecture: the one it was imported as
(``meta.json``), else ``bluelm-vlm`` when its config has a vision preset, else ``bluelm-decoder``.
"""
from __future__ import annotations

import os
import shutil
from types import ModuleType
from typing import Optional

import torch

from megatron_bluelm.convert import hf_io, lfm2_vl, llama, megatron_io
from megatron_bluelm.convert.mapping import ConversionError, Dims, from_hf, to_hf
from megatron_bluelm.data.tokenizer import is_hf_tokenizer

ARCHITECTURES: dict[str, ModuleType] = {"bluelm-decoder": llama, "bluelm-vlm": lfm2_vl}
HF_TO_ARCH = {m.HF_ARCHITECTURE: name for name, m in ARCHITECTURES.items()}
DEFAULT_SHARD_BYTES = 2 * 2**30


def architecture(name: str) -> ModuleType:
    if name not in ARCHITECTURES:
        raise ConversionError(f"unsupported architecture {name!r}; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _dims(model, vocab_size: int, vision=None) -> dict[str, Dims]:
    """The sizes the mapping's fused layouts need, per tower (``text``; ``vision`` for the VLM)."""
    lm = getattr(model, "language_model", model)
    c = lm.config
    dims = {"text": Dims(num_heads=c.num_attention_heads, num_groups=c.num_query_groups, head_dim=c.kv_channels,
                         vocab_size=vocab_size, padded_vocab_size=lm.vocab_size)}
    if vision is not None and vision.enabled:
        heads = vision.num_attention_heads
        dims["vision"] = Dims(num_heads=heads, num_groups=heads, head_dim=vision.hidden_size // heads,
                              patch_size=vision.patch_size)
    return dims


def _checkpoint_architecture(meta: dict, path: str, requested: Optional[str]) -> str:
    """The checkpoint's architecture; ``requested`` (an HF architecture name) must agree with it."""
    multimodal = meta["config"].get("vision", {}).get("preset", "none") != "none"
    name = meta.get("architecture") or ("bluelm-vlm" if multimodal else "bluelm-decoder")
    if requested is not None and requested != "auto":
        if requested not in HF_TO_ARCH:
            raise ConversionError(f"unsupported HF architecture {requested!r}; supported: {sorted(HF_TO_ARCH)}")
        if HF_TO_ARCH[requested] != name:
            kind = "a multimodal (ViT + adapter + decoder)" if multimodal else "a text-only"
            raise ConversionError(f"'{path}' holds {kind} model, exported as {architecture(name).HF_ARCHITECTURE}; "
                                  f"it cannot be exported as {requested}")
    return name


def megatron_to_hf(load: str, out: str, *, tokenizer_model: str | None = None, dtype: str | None = None,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES, hf_architecture: str | None = None) -> str:
    """Export the newest complete checkpoint under ``load`` (or the iteration dir ``load``) to ``out``.
    ``hf_architecture`` (default: from the checkpoint) is checked against what the checkpoint holds."""
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.training.checkpointing import read_meta, resolve_checkpoint, verify_files

    path, _ = resolve_checkpoint(load)
    if path is None:
        raise ConversionError(f"'{load}' holds no complete checkpoint")
    meta = read_meta(path)
    verify_files(path)  # a damaged file is named before the model is built (megatron-core's errors name none)
    arch = architecture(_checkpoint_architecture(meta, path, hf_architecture))
    cfg = megatron_io.run_config_from_meta(meta)
    if tokenizer_model:
        cfg.data.tokenizer_model = tokenizer_model
    tok = load_tokenizer(cfg.data.tokenizer_model)
    megatron_io.start_single_process()
    model = megatron_io.build_model(cfg, cfg.model.vocab_size or tok.vocab_size, tok.special_ids.get("<image>"))
    state = megatron_io.load_full(model, path)
    dtype = dtype or meta.get("hf_dtype", "float32")
    tensors = {k: v.to(hf_io.DTYPES[dtype]).contiguous() for k, v in
               to_hf(arch.TABLE, state, _dims(model, tok.vocab_size, cfg.vision)).items()}
    config = arch.export_config(cfg, tok.vocab_size, dtype, tok.special_ids)
    _write_hf_dir(out, tensors, config, cfg.data.tokenizer_model, max_shard_bytes)
    if hasattr(arch, "write_processor"):  # the VLM's image processor + processor (remote code)
        arch.write_processor(out, config)
    return out


def _write_hf_dir(out: str, tensors: dict, config: dict, tokenizer_model: str, max_shard_bytes: int) -> None:
    from megatron_bluelm.convert.hf_tokenizer import save_hf_tokenizer

    os.makedirs(out, exist_ok=True)
    hf_io.save_tensors(out, tensors, max_shard_bytes)
    hf_io.write_json(os.path.join(out, "config.json"), config)
    hf_io.write_json(os.path.join(out, "generation_config.json"), hf_io.generation_config(config))
    save_hf_tokenizer(tokenizer_model, out)
    if not is_hf_tokenizer(tokenizer_model):
        # The SentencePiece model itself travels along: HF -> megatron needs it for training. (A
        # tokenizer.json run needs nothing more: the exported tokenizer.json is its tokenizer.)
        shutil.copyfile(tokenizer_model, os.path.join(out, "tokenizer.model"))


def hf_to_megatron(hf_dir: str, out: str, *, seq_length: int | None = None) -> str:
    """Import an HF directory (as exported above) as a model-only megatron checkpoint under ``out``."""
    from megatron_bluelm.config.errors import ConfigError
    from megatron_bluelm.config.presets import apply_preset
    from megatron_bluelm.data.tokenizer import load_tokenizer

    config = hf_io.read_json(os.path.join(hf_dir, "config.json"))
    archs = config.get("architectures") or []
    name = next((HF_TO_ARCH[a] for a in archs if a in HF_TO_ARCH), None)
    if name is None:
        raise ConversionError(f"unsupported HF architecture {archs} in '{hf_dir}/config.json'; "
                              f"supported: {sorted(HF_TO_ARCH)}")
    arch = architecture(name)
    try:
        cfg = arch.import_config(config)
    except (KeyError, ValueError, ConfigError) as e:
        raise ConversionError(f"'{hf_dir}/config.json': not convertible: {e}") from None
    apply_preset(cfg.model)  # fills nothing the HF config set; keeps the defaults complete
    spm_model = os.path.join(hf_dir, "tokenizer.model")
    # Our exports carry the SentencePiece model; any other HF directory is used through its tokenizer.json.
    cfg.data.tokenizer_model = os.path.abspath(spm_model if os.path.isfile(spm_model) else hf_dir)
    vocab = load_tokenizer(cfg.data.tokenizer_model).vocab_size
    if vocab > cfg.model.vocab_size:
        raise ConversionError(f"'{hf_dir}': the tokenizer has {vocab} ids with the project's special tokens "
                              f"added, the model's vocab_size is {cfg.model.vocab_size}")
    if seq_length:
        cfg.data.seq_length = seq_length
    cfg.training.precision = "fp32"
    image_token_id = None
    if cfg.vision.enabled:
        image_token_id = load_tokenizer(cfg.data.tokenizer_model).special_ids["<image>"]
        if config.get("image_token_id") != image_token_id:
            raise ConversionError(f"'{hf_dir}/config.json': image_token_id {config.get('image_token_id')} is not "
                                  f"the tokenizer's <image> id ({image_token_id})")
    hstate = hf_io.load_tensors(hf_dir)
    dtype = str(next(iter(hstate.values())).dtype).replace("torch.", "")
    vocab_size = cfg.model.vocab_size
    megatron_io.start_single_process()
    model = megatron_io.build_model(cfg, vocab_size, image_token_id)
    expected = {k: tuple(v.shape) for k, v in megatron_io._tensors(model).items()}
    mstate = from_hf(arch.TABLE, hstate, _dims(model, vocab_size, cfg.vision), expected)
    with torch.no_grad():
        for name_, param in model.state_dict(keep_vars=True).items():
            if name_ in mstate:
                param.copy_(mstate[name_].to(param.dtype))
    megatron_io.save_model_only(model, cfg, out, {"architecture": name, "hf_dtype": dtype})
    return out
