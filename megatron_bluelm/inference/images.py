"""Image prompts: image files -> tiles, and ``<image>`` placeholders -> the exact image-token blocks.

The processing is training's own (``data/images.py``): the same tiling (relaxed aspect-ratio grid +
thumbnail), the same normalization, and ``expand_image_tokens`` for the token blocks, so a prompt
sees its images exactly as the multimodal stage's samples did. Placeholders follow training's rule
too: one ``<image>`` per image, or none and the images go in front of the text.

Only the first pipeline stage (the one holding the ViT) needs the pixels; every rank needs the token
blocks, whose length depends only on the image size. Every rank decodes the files, so a corrupt
image fails on all ranks with the same error instead of leaving some of them waiting.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from megatron_bluelm.data.images import IMAGE, IMG_END, IMG_START, ImageError, ImageProcessor, expand_image_tokens
from megatron_bluelm.data.images import open_image as decode_image
from megatron_bluelm.inference.errors import GenerationError


def load_image(src, where: str) -> Image.Image:
    """A path or a PIL image -> a decoded PIL image; errors name the file."""
    if isinstance(src, Image.Image):
        return src
    path = os.fspath(src)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise GenerationError(f"{where}: cannot read image file '{path}': {e.strerror}") from None
    try:
        return decode_image(data, f"{where}: image file '{path}'")
    except ImageError as e:
        raise GenerationError(str(e)) from None


def assign_images(texts: Sequence[str], images: Sequence) -> list[list]:
    """Spread one list of images (e.g. repeated ``--image``) over prompts: the k-th ``<image>``
    placeholder, counting through the prompts in order, takes the k-th image. Without any
    placeholder, a single prompt takes them all (in front of its text)."""
    counts = [t.count(IMAGE) for t in texts]
    total = sum(counts)
    if not images:
        return [[] for _ in texts]
    if total == 0:
        if len(texts) == 1:
            return [list(images)]
        raise GenerationError(f"{len(images)} image(s) for {len(texts)} prompts without any {IMAGE} placeholder: "
                              f"put one {IMAGE} in the prompts where each image belongs")
    if total != len(images):
        per_prompt = ", ".join(f"prompt {i}: {c}" for i, c in enumerate(counts))
        raise GenerationError(f"the prompts have {total} {IMAGE} placeholder(s) ({per_prompt}) but {len(images)} "
                              "image(s) were given: give one image per placeholder")
    out, it = [], iter(images)
    for c in counts:
        out.append([next(it) for _ in range(c)])
    return out


@dataclass
class PromptImages:
    """Expands token prompts with their images for one multimodal model (one rank of it)."""

    processor: ImageProcessor
    ids: dict  # <image>, <img_start>, <img_end> -> token id
    with_pixels: bool = True  # False on pipeline stages without the ViT

    @classmethod
    def for_model(cls, vision_cfg, tokenizer, with_pixels: bool) -> "PromptImages":
        ids = {t: tokenizer.special_ids[t] for t in (IMAGE, IMG_START, IMG_END)}
        return cls(ImageProcessor.from_config(vision_cfg), ids, with_pixels)

    def expand(self, prompts: Sequence[Sequence[int]], images: Sequence[Sequence], max_context: int
               ) -> tuple[list[list[int]], torch.Tensor | None]:
        """(prompts with every image's token block, tiles of all images in prompt order [n, 3, S, S];
        None when no prompt has an image or this stage has no ViT)."""
        if len(images) != len(prompts):
            raise GenerationError(f"images: {len(images)} image lists for {len(prompts)} prompts (one list per "
                                  "prompt, empty for a prompt without images)")
        out, tiles = [], []
        for i, (prompt, srcs) in enumerate(zip(prompts, images)):
            loaded = [load_image(src, f"prompt {i}: image {k}") for k, src in enumerate(srcs)]
            counts = [self.processor.num_tiles(im.width, im.height) for im in loaded]
            tokens = np.asarray(prompt, np.int64)
            try:
                expanded, _ = expand_image_tokens(tokens, np.ones(len(tokens), np.uint8), counts,
                                                  self.processor.tokens_per_tile, self.ids, f"prompt {i}")
            except ImageError as e:
                raise GenerationError(str(e)) from None
            text_tokens = len(tokens) - int((tokens == self.ids[IMAGE]).sum())
            self._check_length(i, text_tokens, len(expanded), counts, max_context)
            out.append(expanded.tolist())
            if self.with_pixels:
                tiles += [self.processor.tiles(im) for im in loaded]
        if not tiles:
            return out, None
        return out, torch.cat(tiles)

    def _check_length(self, i: int, text_tokens: int, total: int, tiles: list[int], max_context: int) -> None:
        if total < max_context:
            return
        image_tokens = total - text_tokens
        raise GenerationError(
            f"prompt {i}: {text_tokens} text tokens + {image_tokens} image tokens ({len(tiles)} image(s): "
            f"{sum(tiles)} tiles x {self.processor.tokens_per_tile} tokens + 2 framing tokens per image) = {total} "
            f"tokens; the model's context is {max_context} (data.seq_length), which leaves no room to generate; "
            "use fewer or smaller images or a shorter prompt")

