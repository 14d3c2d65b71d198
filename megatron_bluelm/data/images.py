"""Dynamic-resolution image processing and image-token splicing (docs/MULTIMODAL.md).

Tiling (relaxed aspect-ratio matching, after BlueLM-V-3B): every grid of ``rows x cols`` tiles with
``rows * cols <= max_tiles`` is a candidate canvas of ``cols*S x rows*S`` pixels (S = the ViT's tile
side). Fitting the image into a canvas (aspect kept) gives its

    effective resolution = min(w * h * scale^2, w * h),   scale = min(cols*S / w, rows*S / h)
    wasted resolution    = rows * cols * S^2 - effective

The strict rule (LLaVA-NeXT) takes the largest effective resolution; the *relaxed* rule accepts every
candidate within ``RELAX`` (90%) of the largest and among those takes the least wasted resolution,
then the fewest tiles. It stops small images from being blown up to the largest grid for a few more
effective pixels, and prefers grids whose shape follows the image's aspect ratio.

The image is then resized (bicubic, aspect ratio as the grid's) to exactly ``cols*S x rows*S`` and cut
into tiles in row-major order; when the grid has more than one tile and ``thumbnail`` is on, the whole
image resized to ``S x S`` follows as the last tile. Pixels are scaled to [-1, 1] (SigLIP's
normalization: mean 0.5, std 0.5 per channel).

Tokens: each ``<image>`` placeholder of the text becomes

    <img_start> + tiles * tokens_per_tile x <image> + <img_end>,  tokens_per_tile = (S / patch / 2)^2

so an image costs exactly ``tiles * tokens_per_tile + 2`` sequence positions, with
``tiles = rows * cols + (1 if thumbnail and rows * cols > 1 else 0)``. Loss is masked wherever the
*label* is one of the three image tokens (nothing to predict there); the text after ``<img_end>`` is
learned from the image.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

RELAX = 0.9
IMAGE, IMG_START, IMG_END = "<image>", "<img_start>", "<img_end>"


class ImageError(ValueError):
    """An image that cannot be used; the message names the record and the image."""


def candidate_grids(max_tiles: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles]


def choose_grid(width: int, height: int, tile: int, max_tiles: int, relax: float = RELAX) -> tuple[int, int]:
    """(rows, cols) by relaxed aspect-ratio matching (module docstring)."""
    scored = []
    for rows, cols in candidate_grids(max_tiles):
        scale = min(cols * tile / width, rows * tile / height)
        effective = min(width * height * scale * scale, width * height)
        scored.append((effective, rows * cols * tile * tile - effective, rows * cols, rows, cols))
    best_effective = max(s[0] for s in scored)
    accepted = [s for s in scored if s[0] >= relax * best_effective]
    _, _, _, rows, cols = min(accepted, key=lambda s: (s[1], s[2]))
    return rows, cols


@dataclass(frozen=True)
class ImageProcessor:
    tile: int  # S, the ViT's resolution
    patch: int
    max_tiles: int
    thumbnail: bool = True

    @classmethod
    def from_config(cls, v) -> "ImageProcessor":
        return cls(v.image_size, v.patch_size, v.max_tiles, v.thumbnail)

    @property
    def tokens_per_tile(self) -> int:
        return (self.tile // self.patch // 2) ** 2

    def num_tiles(self, width: int, height: int) -> int:
        rows, cols = choose_grid(width, height, self.tile, self.max_tiles)
        return rows * cols + int(self.thumbnail and rows * cols > 1)

    def num_tokens(self, width: int, height: int) -> int:
        """Sequence positions one image takes, <img_start> and <img_end> included."""
        return self.num_tiles(width, height) * self.tokens_per_tile + 2

    def tiles(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalized tiles [n, 3, S, S] (float32)."""
        image = image.convert("RGB")
        rows, cols = choose_grid(image.width, image.height, self.tile, self.max_tiles)
        canvas = np.asarray(image.resize((cols * self.tile, rows * self.tile), Image.BICUBIC))
        s = self.tile
        tiles = [canvas[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]
        if self.thumbnail and rows * cols > 1:
            tiles.append(np.asarray(image.resize((s, s), Image.BICUBIC)))
        x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0  # (x / 255 - 0.5) / 0.5


def open_image(data: bytes, where: str) -> Image.Image:
    """Decode encoded image bytes, or raise ImageError naming ``where`` (record and image)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        raise ImageError(f"{where}: cannot decode image: {type(e).__name__}: {e}") from None
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{where}: image has no pixels ({image.width} x {image.height})")
    return image


def image_size(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) from the header only; cheap on pipeline stages that do not run the ViT."""
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception as e:
        raise ImageError(f"{where}: cannot decode image: {type(e).__name__}: {e}") from None


def expand_image_tokens(tokens: np.ndarray, loss_mask: np.ndarray, tiles_per_image: list[int],
                        tokens_per_tile: int, ids: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Replace the i-th ``<image>`` of ``tokens`` by the i-th image's token block (module docstring).

    ``loss_mask`` is per token (1 = learn to predict this token); the image blocks get 0. Text without
    any placeholder gets the images in front of it (captions); otherwise the counts must match."""
    image_id = ids[IMAGE]
    slots = np.flatnonzero(tokens == image_id)
    if len(slots) == 0 and tiles_per_image:
        tokens = np.concatenate([np.full(len(tiles_per_image), image_id, tokens.dtype), tokens])
        loss_mask = np.concatenate([np.zeros(len(tiles_per_image), loss_mask.dtype), loss_mask])
        slots = np.arange(len(tiles_per_image))
    if len(slots) != len(tiles_per_image):
        raise ImageError(f"{where}: the text has {len(slots)} {IMAGE} placeholders for {len(tiles_per_image)} "
                         "images (give one per image, or none to put the images first)")
    out_t, out_m, prev = [], [], 0
    for slot, tiles in zip(slots, tiles_per_image):
        block = [ids[IMG_START]] + [image_id] * (tiles * tokens_per_tile) + [ids[IMG_END]]
        out_t += [tokens[prev:slot], np.asarray(block, tokens.dtype)]
        out_m += [loss_mask[prev:slot], np.zeros(len(block), loss_mask.dtype)]
        prev = slot + 1
    out_t.append(tokens[prev:])
    out_m.append(loss_mask[prev:])
    return np.concatenate(out_t), np.concatenate(out_m)
