"""The multimodal export's Hugging Face processor: our tiling as an image processor, and a processor
(tokenizer + image processor) that expands each ``<image>`` to the image's token block.

This file travels with every multimodal export (``processing_bluelm.py``, loaded through ``auto_map``
with ``trust_remote_code=True``), next to ``bluelm_images.py``: a verbatim copy of ``data/images.py``,
so the exported processor tiles, resizes, normalizes and expands exactly as training does (one source).

    processor = AutoProcessor.from_pretrained(export_dir, trust_remote_code=True)
    inputs = processor(images=[image], text="<|user|>\\n<image> What is it?<|end|>\\n<|assistant|>\\n",
                       return_tensors="pt")
    model.generate(**inputs)                       # Lfm2VlForConditionalGeneration

Outputs: ``input_ids`` / ``attention_mask`` (left padded for batches, as the tokenizer says),
``pixel_values [tiles, g*g, p*p*3]`` (every image's tiles in order, the thumbnail last), their
``spatial_shapes`` (g, g) and an all-ones ``pixel_attention_mask`` (a tile is never padded); the
tiles each image takes: ``processor.image_processor.tiles_per_image(images)``.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import transformers
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ProcessorMixin

try:  # in an exported directory: the copy of data/images.py beside this file
    from .bluelm_images import IMAGE, IMG_END, IMG_START, ImageProcessor, expand_image_tokens
except ImportError:  # imported from the project itself
    from megatron_bluelm.data.images import IMAGE, IMG_END, IMG_START, ImageProcessor, expand_image_tokens

OLD_TRANSFORMERS_MODEL = (
    f"transformers {transformers.__version__}: the model of this export needs transformers >= 5. The processor "
    "works here, but 4.x builds Lfm2Vl with a projector LayerNorm and other vision-tower names, so loading "
    "the model would leave its vision tower at random weights (without an error) and every image answer wrong")
IMAGES_MODULE = "bluelm_images.py"  # the export's name for data/images.py (the relative import above)


def hf_pixel_inputs(tiles: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """Our tiles ``[n, 3, S, S]`` -> Lfm2Vl's image inputs: ``pixel_values [n, g*g, p*p*3]`` (patches
    row-major, each flattened in (row, column, channel) order, the layout of the exported patch
    Linear), ``spatial_shapes [n, 2]`` = (g, g), ``pixel_attention_mask [n, g*g]`` all ones."""
    n, c, s, _ = tiles.shape
    g = s // patch_size
    patches = tiles.reshape(n, c, g, patch_size, g, patch_size).permute(0, 2, 4, 3, 5, 1)
    return {"pixel_values": patches.reshape(n, g * g, patch_size * patch_size * c).contiguous(),
            "spatial_shapes": torch.tensor([[g, g]] * n, dtype=torch.long),
            "pixel_attention_mask": torch.ones(n, g * g, dtype=torch.int32)}


def _pil(image):
    """PIL images pass; a local path (what chat messages' ``{"type": "image", "path": ...}`` hand over)
    is opened as training opens image files (no EXIF rotation); uint8 HWC arrays are wrapped."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, str) and "://" not in image:
        return Image.open(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        return Image.fromarray(image)
    raise TypeError(f"images must be PIL images, local paths or uint8 HWC arrays, got {image!r:.80}")


def _flat(images) -> list:
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [im for item in images for im in _flat(item)]


class BlueLMImageProcessor(BaseImageProcessor):
    """Relaxed aspect-ratio tiling at the ViT's resolution + an S x S thumbnail, pixels in [-1, 1]
    (``data/images.py``), as Lfm2Vl's patch inputs."""

    model_input_names = ["pixel_values", "spatial_shapes", "pixel_attention_mask"]

    def __init__(self, tile_size: int = 364, patch_size: int = 14, max_tiles: int = 9, thumbnail: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        self.tile_size, self.patch_size, self.max_tiles, self.thumbnail = tile_size, patch_size, max_tiles, thumbnail

    @property
    def tiler(self) -> ImageProcessor:
        return ImageProcessor(self.tile_size, self.patch_size, self.max_tiles, self.thumbnail)

    def tiles_per_image(self, images) -> list[int]:
        return [self.tiler.num_tiles(*_pil(im).size) for im in _flat(images)]

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        """Every image (a flat or nested list, in prompt order) -> its tiles, concatenated."""
        tiler = self.tiler
        tiles = [tiler.tiles(_pil(im)) for im in _flat(images)]
        if not tiles:
            return BatchFeature({})
        return BatchFeature(hf_pixel_inputs(torch.cat(tiles), self.patch_size), tensor_type=return_tensors)


class BlueLMProcessor(ProcessorMixin):
    """Tokenizer + ``BlueLMImageProcessor``. The k-th ``<image>`` of the text, counting through the
    batch in order, takes the k-th image and becomes ``<img_start>`` + tiles x tokens-per-tile
    ``<image>`` + ``<img_end>``; a single text without a placeholder takes its images in front
    (training's rule, ``expand_image_tokens``)."""

    if not hasattr(ProcessorMixin, "get_attributes"):  # transformers 4.x; 5.x reads __init__'s signature
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if int(transformers.__version__.split(".")[0]) < 5:
            # The processor itself works on 4.x; the model beside it does not, and 4.x gives no error
            warnings.warn(OLD_TRANSFORMERS_MODEL, stacklevel=2)

    def _ids(self) -> dict:
        return {t: self.tokenizer.convert_tokens_to_ids(t) for t in (IMAGE, IMG_START, IMG_END)}

    def __call__(self, images=None, text=None, return_tensors=None, padding=None, **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("BlueLMProcessor needs text (with one <image> per image, or none for one text)")
        texts = [text] if isinstance(text, str) else list(text)
        flat = _flat(images)
        ids = self._ids()
        prompts = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        counts = self.image_processor.tiles_per_image(flat)
        placeholders = [sum(1 for i in p if i == ids[IMAGE]) for p in prompts]
        if sum(placeholders) == 0 and len(texts) == 1:
            placeholders = [len(flat)]  # expand_image_tokens puts them in front
        if sum(placeholders) != len(flat):
            raise ValueError(f"the text has {sum(placeholders)} {IMAGE} placeholder(s) for {len(flat)} image(s): "
                             f"give one {IMAGE} per image")
        tiler = self.image_processor.tiler
        expanded, start = [], 0
        for i, (prompt, n) in enumerate(zip(prompts, placeholders)):
            tokens = np.asarray(prompt, np.int64)
            out, _ = expand_image_tokens(tokens, np.ones(len(tokens), np.uint8), counts[start:start + n],
                                         tiler.tokens_per_tile, ids, f"text {i}")
            expanded.append(out.tolist())
            start += n
        padding = padding if padding is not None else len(expanded) > 1
        data = dict(self.tokenizer.pad({"input_ids": expanded}, padding=padding, return_tensors=return_tensors))
        if flat:
            data.update(self.image_processor(flat, return_tensors=return_tensors))
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", *BlueLMImageProcessor.model_input_names]
