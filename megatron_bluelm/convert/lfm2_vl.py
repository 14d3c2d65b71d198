"""The multimodal model (ViT + adapter + decoder) as a Hugging Face ``Lfm2VlForConditionalGeneration``.

Lfm2Vl is the ``transformers`` architecture with our structure: a vision tower built from any vision
config, a projector ``pixel unshuffle -> [LayerNorm] -> Linear -> act -> Linear``, and a text model built
from any text config. We configure it as:

* ``vision_config``: ``Siglip2VisionConfig`` — SigLIP layers (LayerNorm, biases, GELU(tanh) MLP,
  bidirectional attention) and a final ``post_layernorm``, no pooling head. Its patch embedding is a
  Linear over patches flattened in (row, column, channel) order: our Conv2d weight ``[D, C, p, p]`` is
  permuted into it (mapping ``fuse="patch"``). Its learned position embeddings (``num_patches`` = g * g
  for a g x g patch grid) are resized by bilinear interpolation (antialias) to each image's patch grid;
  at the native grid, which every one of our tiles has, that resize is exactly the identity (tested).
* ``text_config``: ``LlamaConfig`` — the decoder's own export (``convert/llama.py``).
* projector: ``downsample_factor=2``, no LayerNorm, exact (erf) ``gelu``, biases, hidden width
  ``vision.adapter_hidden_size``. Lfm2Vl's pixel unshuffle concatenates each 2 x 2 block of patch
  features as (top-left, top-right, bottom-left, bottom-right), row-major over the blocks — the order
  of ``models/adapter.py:pixel_unshuffle``, so ``linear_1`` is our ``linear_in`` unpermuted (tested).
* ``image_token_id`` = our ``<image>``; ``tie_word_embeddings=False`` (untied, as the decoder).

Inputs: each of our tiles (the thumbnail too) is one Siglip2 "image" of ``spatial_shapes = (g, g)`` with
an all-ones ``pixel_attention_mask``; ``processing_bluelm.hf_pixel_inputs`` makes them from
``data/images.py:ImageProcessor.tiles``. The ``<image>`` tokens of a tile are contiguous and the tiles
come in order, so Lfm2Vl's ``masked_scatter`` places them where our splicing does. ``<img_start>`` /
``<img_end>`` are plain text tokens. No ``transformers`` image processor reproduces our tiling
(relaxed aspect-ratio grid, PIL bicubic, S x S thumbnail), so the export carries its own
(``processing_bluelm.py`` + a copy of ``data/images.py``, ``trust_remote_code``; :func:`write_processor`);
the tiling settings are also kept in config.json under ``bluelm_image_tiling`` (docs/MULTIMODAL.md).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import replace

from megatron_bluelm.convert import llama
from megatron_bluelm.convert.hf_io import write_json
from megatron_bluelm.convert.mapping import ParamMap
from megatron_bluelm.data import images

HF_ARCHITECTURE = "Lfm2VlForConditionalGeneration"
TILING_KEY = "bluelm_image_tiling"


def _text_name(hf: str) -> str:
    """Llama's names inside Lfm2Vl: ``model.X`` -> ``model.language_model.X``; ``lm_head`` stays."""
    return "model.language_model." + hf[len("model."):] if hf.startswith("model.") else hf


TEXT = tuple(replace(pm, megatron="language_model." + pm.megatron, hf=tuple(_text_name(h) for h in pm.hf))
             for pm in llama.TABLE)

V = "vision_model.decoder.layers.{layer}."
HV = "model.vision_tower.encoder.layers.{layer}."
E = "model.vision_tower.embeddings."
VISION = (
    ParamMap("vision_model.patch_embedding.weight", (E + "patch_embedding.weight",), fuse="patch", dims="vision"),
    ParamMap("vision_model.patch_embedding.bias", (E + "patch_embedding.bias",)),
    ParamMap("vision_model.position_embedding.weight", (E + "position_embedding.weight",)),
    ParamMap(V + "input_layernorm.weight", (HV + "layer_norm1.weight",)),
    ParamMap(V + "input_layernorm.bias", (HV + "layer_norm1.bias",)),
    ParamMap(V + "self_attention.linear_qkv.weight",
             (HV + "self_attn.q_proj.weight", HV + "self_attn.k_proj.weight", HV + "self_attn.v_proj.weight"),
             tp_dim=0, fuse="qkv", dims="vision"),
    ParamMap(V + "self_attention.linear_qkv.bias",
             (HV + "self_attn.q_proj.bias", HV + "self_attn.k_proj.bias", HV + "self_attn.v_proj.bias"),
             tp_dim=0, fuse="qkv", dims="vision"),
    ParamMap(V + "self_attention.linear_proj.weight", (HV + "self_attn.out_proj.weight",), tp_dim=1),
    ParamMap(V + "self_attention.linear_proj.bias", (HV + "self_attn.out_proj.bias",)),
    ParamMap(V + "pre_mlp_layernorm.weight", (HV + "layer_norm2.weight",)),
    ParamMap(V + "pre_mlp_layernorm.bias", (HV + "layer_norm2.bias",)),
    ParamMap(V + "mlp.linear_fc1.weight", (HV + "mlp.fc1.weight",), tp_dim=0),
    ParamMap(V + "mlp.linear_fc1.bias", (HV + "mlp.fc1.bias",), tp_dim=0),
    ParamMap(V + "mlp.linear_fc2.weight", (HV + "mlp.fc2.weight",), tp_dim=1),
    ParamMap(V + "mlp.linear_fc2.bias", (HV + "mlp.fc2.bias",)),
    ParamMap("vision_model.post_layernorm.weight", ("model.vision_tower.post_layernorm.weight",)),
    ParamMap("vision_model.post_layernorm.bias", ("model.vision_tower.post_layernorm.bias",)),
)
P = "model.multi_modal_projector."
ADAPTER = (
    ParamMap("adapter.linear_in.weight", (P + "linear_1.weight",), tp_dim=0),  # column parallel
    ParamMap("adapter.linear_in.bias", (P + "linear_1.bias",), tp_dim=0),
    ParamMap("adapter.linear_out.weight", (P + "linear_2.weight",), tp_dim=1),  # row parallel
    ParamMap("adapter.linear_out.bias", (P + "linear_2.bias",)),
)
TABLE: tuple[ParamMap, ...] = TEXT + VISION + ADAPTER

# What our model fixes in the Lfm2Vl config; an HF config with other values is not our structure.
FIXED = {"projector_use_layernorm": False, "projector_hidden_act": "gelu", "projector_bias": True,
         "downsample_factor": 2, "tie_word_embeddings": False}
VISION_FIXED = {"model_type": "siglip2_vision_model", "hidden_act": "gelu_pytorch_tanh", "num_channels": 3,
                "vision_use_head": False}


def export_config(cfg, vocab_size: int, dtype: str, special_ids: dict) -> dict:
    """config.json for ``transformers.Lfm2VlConfig`` from a multimodal run config."""
    v = cfg.vision
    grid = v.image_size // v.patch_size
    text = llama.export_config(cfg, vocab_size, dtype, special_ids)
    del text["architectures"]
    vision = dict(VISION_FIXED, hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
                  num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads,
                  patch_size=v.patch_size, num_patches=grid * grid, layer_norm_eps=v.norm_eps,
                  attention_dropout=0.0, dtype=dtype)
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": "lfm2_vl",
        "text_config": text,
        "vision_config": vision,
        **FIXED,
        "projector_hidden_size": v.adapter_hidden_size or cfg.model.hidden_size,
        "image_token_id": special_ids["<image>"],
        TILING_KEY: {"tile_size": v.image_size, "max_tiles": v.max_tiles, "thumbnail": v.thumbnail},
        "bos_token_id": text["bos_token_id"],
        "eos_token_id": text["eos_token_id"],
        "pad_token_id": text["pad_token_id"],
        "dtype": dtype,
    }


def _vision_preset_name(fields: dict) -> str:
    """The preset with exactly this shape, else ``vit-so400m`` (every field is set explicitly anyway)."""
    from megatron_bluelm.config.vision import VISION_PRESETS

    for name, preset in VISION_PRESETS.items():
        if all(fields[k] == preset[k] for k in preset):
            return name
    return "vit-so400m"


def import_config(config: dict):
    """HF config.json -> a multimodal ``RunConfig``; ValueError / KeyError name what does not fit."""
    if HF_ARCHITECTURE not in config.get("architectures", []):
        raise ValueError(f"architectures {config.get('architectures')}")
    for key, want in FIXED.items():
        if config.get(key) != want:
            raise ValueError(f"{key}: {config.get(key)!r}, our model has {want!r}")
    vc, tc = config["vision_config"], config["text_config"]
    for key, want in VISION_FIXED.items():
        if vc.get(key) != want:
            raise ValueError(f"vision_config.{key}: {vc.get(key)!r}, our ViT has {want!r}")
    if tc.get("model_type") != "llama":
        raise ValueError(f"text_config.model_type: {tc.get('model_type')!r}, our decoder is 'llama'-shaped")
    grid = math.isqrt(vc["num_patches"])
    if grid * grid != vc["num_patches"] or grid % 2:
        raise ValueError(f"vision_config.num_patches ({vc['num_patches']}) must be g * g for an even patch grid g "
                         "(the 2 x 2 downsampling)")
    cfg = llama.import_config(tc)
    v = cfg.vision
    fields = dict(num_layers=vc["num_hidden_layers"], hidden_size=vc["hidden_size"],
                  ffn_hidden_size=vc["intermediate_size"], num_attention_heads=vc["num_attention_heads"],
                  patch_size=vc["patch_size"], image_size=grid * vc["patch_size"], norm_eps=vc["layer_norm_eps"])
    for key, value in fields.items():
        setattr(v, key, value)
    v.preset = _vision_preset_name(fields)
    hidden = config["projector_hidden_size"]
    v.adapter_hidden_size = None if hidden == cfg.model.hidden_size else hidden
    tiling = config.get(TILING_KEY, {})
    if tiling.get("tile_size", v.image_size) != v.image_size:
        raise ValueError(f"{TILING_KEY}.tile_size ({tiling['tile_size']}) != patch_size x sqrt(num_patches) "
                         f"({v.image_size})")
    v.max_tiles = tiling.get("max_tiles", v.max_tiles)
    v.thumbnail = tiling.get("thumbnail", v.thumbnail)
    v.resolve()
    return cfg


PROCESSOR_MODULE = "processing_bluelm"  # convert/processing_bluelm.py; transformers loads it from the export


def write_processor(out: str, config: dict) -> None:
    """The export's processor: ``processing_bluelm.py``, ``bluelm_images.py`` (``data/images.py`` as is),
    and the configs that make ``AutoProcessor`` / ``AutoImageProcessor`` (trust_remote_code) load them."""
    here = os.path.dirname(os.path.abspath(__file__))
    module = PROCESSOR_MODULE
    shutil.copyfile(os.path.join(here, module + ".py"), os.path.join(out, module + ".py"))
    shutil.copyfile(images.__file__, os.path.join(out, "bluelm_images.py"))  # its relative import
    tiling = config[TILING_KEY]
    write_json(os.path.join(out, "preprocessor_config.json"), {
        "image_processor_type": "BlueLMImageProcessor", "processor_class": "BlueLMProcessor",
        "auto_map": {"AutoImageProcessor": f"{module}.BlueLMImageProcessor",
                     "AutoProcessor": f"{module}.BlueLMProcessor"},
        "tile_size": tiling["tile_size"], "max_tiles": tiling["max_tiles"], "thumbnail": tiling["thumbnail"],
        "patch_size": config["vision_config"]["patch_size"]})
    write_json(os.path.join(out, "processor_config.json"), {
        "processor_class": "BlueLMProcessor", "auto_map": {"AutoProcessor": f"{module}.BlueLMProcessor"}})
