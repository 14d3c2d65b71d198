"""The two conversions: a megatron checkpoint (any layout) -> HF directory, and back.

    megatron_to_hf("outputs/run/ckpt", "outputs/hf")         # newest complete checkpoint
    hf_to_megatron("outputs/hf", "outputs/ckpt_from_hf")      # model-only, TP1 (loads into any layout)

Architectures are looked up in ``ARCHITECTURES`` (name -> mapping-table module). The multimodal
model adds its entry here (its table in its own module) with the multimodal issue.
"""
from __future__ import annotations

import os
import shutil
from types import ModuleType

import torch

from megatron_bluelm.convert import hf_io, llama, megatron_io
from megatron_bluelm.convert.mapping import ConversionError, Dims, from_hf, to_hf

ARCHITECTURES: dict[str, ModuleType] = {"bluelm-decoder": llama}
HF_TO_ARCH = {m.HF_ARCHITECTURE: name for name, m in ARCHITECTURES.items()}
DEFAULT_SHARD_BYTES = 2 * 2**30


def architecture(name: str) -> ModuleType:
    if name not in ARCHITECTURES:
        raise ConversionError(f"unsupported architecture {name!r}; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _dims(model, vocab_size: int) -> Dims:
    c = model.config
    return Dims(num_heads=c.num_attention_heads, num_groups=c.num_query_groups, head_dim=c.kv_channels,
                vocab_size=vocab_size, padded_vocab_size=model.vocab_size)


def megatron_to_hf(load: str, out: str, *, tokenizer_model: str | None = None, dtype: str | None = None,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Export the newest complete checkpoint under ``load`` (or the iteration dir ``load``) to ``out``."""
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.training.checkpointing import read_meta, resolve_checkpoint

    path, _ = resolve_checkpoint(load)
    if path is None:
        raise ConversionError(f"'{load}' holds no complete checkpoint")
    meta = read_meta(path)
    arch = architecture(meta.get("architecture", "bluelm-decoder"))
    cfg = megatron_io.run_config_from_meta(meta)
    if tokenizer_model:
        cfg.data.tokenizer_model = tokenizer_model
    tok = load_tokenizer(cfg.data.tokenizer_model)
    megatron_io.start_single_process()
    model = megatron_io.build_model(cfg, cfg.model.vocab_size or tok.vocab_size)
    state = megatron_io.load_full(model, path)
    dtype = dtype or meta.get("hf_dtype", "float32")
    tensors = {k: v.to(hf_io.DTYPES[dtype]).contiguous() for k, v in
               to_hf(arch.TABLE, state, _dims(model, tok.vocab_size)).items()}
    config = arch.hf_config(cfg.model, tok.vocab_size, cfg.data.seq_length, dtype, tok.special_ids)
    _write_hf_dir(out, tensors, config, cfg.data.tokenizer_model, max_shard_bytes)
    return out


def _write_hf_dir(out: str, tensors: dict, config: dict, tokenizer_model: str, max_shard_bytes: int) -> None:
    from megatron_bluelm.convert.hf_tokenizer import build_hf_tokenizer

    os.makedirs(out, exist_ok=True)
    hf_io.save_tensors(out, tensors, max_shard_bytes)
    hf_io.write_json(os.path.join(out, "config.json"), config)
    hf_io.write_json(os.path.join(out, "generation_config.json"), hf_io.generation_config(config))
    build_hf_tokenizer(tokenizer_model).save_pretrained(out)
    # The SentencePiece model itself travels along: HF -> megatron needs it for training.
    shutil.copyfile(tokenizer_model, os.path.join(out, "tokenizer.model"))


def hf_to_megatron(hf_dir: str, out: str, *, seq_length: int | None = None) -> str:
    """Import an HF directory (as exported above) as a model-only megatron checkpoint under ``out``."""
    from megatron_bluelm.config.presets import apply_preset
    from megatron_bluelm.config.schema import RunConfig

    config = hf_io.read_json(os.path.join(hf_dir, "config.json"))
    archs = config.get("architectures") or []
    name = next((HF_TO_ARCH[a] for a in archs if a in HF_TO_ARCH), None)
    if name is None:
        raise ConversionError(f"unsupported HF architecture {archs} in '{hf_dir}/config.json'; "
                              f"supported: {sorted(HF_TO_ARCH)}")
    arch = architecture(name)
    cfg = RunConfig()
    try:
        fields = arch.model_fields_from_hf(config)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"'{hf_dir}/config.json': not convertible: {e}") from None
    for key, value in fields.items():
        setattr(cfg.model, key, value)
    apply_preset(cfg.model)  # fills nothing the HF config set; keeps the defaults complete
    cfg.data.tokenizer_model = os.path.abspath(os.path.join(hf_dir, "tokenizer.model"))
    cfg.data.seq_length = seq_length or config.get("max_position_embeddings", 4096)
    cfg.training.precision = "fp32"
    hstate = hf_io.load_tensors(hf_dir)
    dtype = str(next(iter(hstate.values())).dtype).replace("torch.", "")
    megatron_io.start_single_process()
    model = megatron_io.build_model(cfg, fields["vocab_size"])
    expected = {k: tuple(v.shape) for k, v in megatron_io._tensors(model).items()}
    mstate = from_hf(arch.TABLE, hstate, _dims(model, fields["vocab_size"]), expected)
    with torch.no_grad():
        for name_, param in model.state_dict(keep_vars=True).items():
            if name_ in mstate:
                param.copy_(mstate[name_].to(param.dtype))
    megatron_io.save_model_only(model, cfg, out, {"architecture": name, "hf_dtype": dtype})
    return out
