"""Vision settings of the multimodal model: the ViT's shape (from a preset), image tiling, freezing.

``preset: none`` (the default) means a text-only run; the multimodal stage needs a ViT preset.
Numbers not published by the BlueLM-2.5-3B report are our choice (docs/MULTIMODAL.md says which).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_bluelm.config.errors import ConfigError

# SigLIP-so400m shape (patch 14, 27 layers, hidden 1152, 16 heads, FFN 4304). The tile size is 364 =
# 26 x 14: an even patch grid (26 x 26) is needed by the 2 x 2 token downsampling (SigLIP's own 384
# gives 27 x 27). Idefics3 runs the same ViT at 364 for the same reason.
VISION_PRESETS: dict[str, dict] = {
    "vit-so400m": dict(num_layers=27, hidden_size=1152, ffn_hidden_size=4304, num_attention_heads=16,
                       patch_size=14, image_size=364, norm_eps=1e-6),
    # Same structure, small enough for CPU tests: 8 x 8 patches per 112-pixel tile -> 16 tokens.
    "vit-tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     patch_size=14, image_size=112, norm_eps=1e-6),
}
FREEZABLE = ("vision", "adapter", "decoder")


@dataclass
class VisionConfig:
    preset: str = "none"  # a ViT preset (VISION_PRESETS), or none: a text-only run
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    patch_size: Optional[int] = None
    image_size: Optional[int] = None  # tile side in pixels (the ViT's resolution)
    norm_eps: Optional[float] = None
    adapter_hidden_size: Optional[int] = None  # the adapter MLP's width; None: the decoder's hidden size
    max_tiles: int = 6  # most tiles of the dynamic-resolution grid per image (the thumbnail not counted)
    thumbnail: bool = True  # add a whole-image tile when the grid has more than one tile
    freeze: list[str] = field(default_factory=list)  # parts not trained: vision | adapter | decoder
    balance_pipeline: bool = True  # pp > 1: choose parallel.first_stage_layers by the cost model
    # Packing (data/mm_packing.py): several image-text and text records per row, per-record attention.
    pack: bool = False
    max_tiles_per_microbatch: Optional[int] = None  # ViT batch bound; None: what the row's tokens allow
    pack_buffer: int = 4096  # records per first-fit-decreasing shuffle buffer
    recompute: Optional[str] = None  # ViT activation recomputation: none | selective | full; None: training.recompute
    # The ViT attention's SDPA backend on CUDA: measure (the fastest for each shape, timed once per
    # process), default (PyTorch's priority), or one forced (bluelm_kernels/sdpa_choice.py)
    attention_backend: Literal["measure", "default", "cudnn", "flash", "efficient"] = "measure"

    @property
    def enabled(self) -> bool:
        return self.preset != "none"

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size // 2) ** 2

    def resolve(self) -> None:
        """Fill unset fields from the preset, then check them; errors name the field."""
        if not self.enabled:
            return
        if self.preset not in VISION_PRESETS:
            raise ConfigError(f"vision.preset: unknown preset {self.preset!r}; choose one of "
                              f"{['none', *sorted(VISION_PRESETS)]}")
        for key, value in VISION_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.check()

    def check(self, tp: int = 1) -> None:
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "patch_size",
                    "image_size", "max_tiles"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"vision.{key}: must be a positive integer, got {value!r}")
        if self.image_size % (2 * self.patch_size):
            raise ConfigError(f"vision.image_size ({self.image_size}) must be a multiple of 2 x vision.patch_size "
                              f"({2 * self.patch_size}): the 2 x 2 token downsampling needs an even patch grid")
        for key in ("num_attention_heads", "ffn_hidden_size", "hidden_size"):
            if getattr(self, key) % tp:
                raise ConfigError(f"vision.{key} ({getattr(self, key)}) is not divisible by parallel.tp ({tp})")
        if self.adapter_hidden_size is not None and self.adapter_hidden_size % tp:
            raise ConfigError(f"vision.adapter_hidden_size ({self.adapter_hidden_size}) is not divisible by "
                              f"parallel.tp ({tp})")
        if self.max_tiles_per_microbatch is not None and self.max_tiles_per_microbatch <= 0:
            raise ConfigError(f"vision.max_tiles_per_microbatch: must be a positive integer or null, got "
                              f"{self.max_tiles_per_microbatch!r}")
        if self.recompute not in (None, "none", "selective", "full"):
            raise ConfigError(f"vision.recompute: one of none, selective, full (or null: follow training.recompute), "
                              f"got {self.recompute!r}")
        if self.pack_buffer <= 0:
            raise ConfigError(f"vision.pack_buffer: must be a positive integer, got {self.pack_buffer!r}")
        unknown = [f for f in self.freeze if f not in FREEZABLE]
        if unknown:
            raise ConfigError(f"vision.freeze: unknown parts {unknown}; choose from {list(FREEZABLE)}")
        if set(self.freeze) == set(FREEZABLE):
            raise ConfigError("vision.freeze: freezes every part; nothing would be trained")
