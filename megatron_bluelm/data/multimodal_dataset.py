"""Multimodal samples and batches: one record per sample, images tiled at load time.

(``vision.pack: true`` packs several records per row instead: data/mm_packing.py.)
A sample is one record (no packing across records): its tokens with every ``<image>`` expanded to
the image's exact token block (data/images.py), cut or padded to ``seq_length + 1``, and its tiles.
A batch stacks the token tensors and concatenates the tiles of all its samples in order
(``pixel_values`` [tiles, 3, S, S], any number of images per sample, zero included); the model fills
the ``<image>`` slots with them in the same order.

Records are split into train / valid / test by ``data.split`` (contiguous, in file order) and repeated
in seeded per-epoch shuffles until ``num_samples`` are available; errors name the record.
"""
from __future__ import annotations

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.images import IMAGE, ImageError, ImageProcessor, expand_image_tokens, image_size, open_image
from megatron_bluelm.data.multimodal import IMAGES_SUFFIX, MASK_SUFFIX, TEXT_SUFFIX


class MultimodalRecords:
    """Random access to the preprocessed records of PREFIX (data/multimodal.py). ``data.prefix`` names
    the token dataset, PREFIX_text_document, as for text; the other two sit beside it."""

    def __init__(self, text_prefix: str):
        if not text_prefix.endswith(TEXT_SUFFIX):
            raise ConfigError(f"data.prefix: '{text_prefix}' should be the multimodal token dataset, "
                              f"PREFIX{TEXT_SUFFIX} (tools/preprocess_data.py --multimodal)")
        prefix = text_prefix[: -len(TEXT_SUFFIX)]
        for suffix in (TEXT_SUFFIX, MASK_SUFFIX, IMAGES_SUFFIX):
            try:
                open(prefix + suffix + ".idx", "rb").close()
            except OSError:
                raise ConfigError(f"data.prefix: no such file '{prefix}{suffix}.idx' — run "
                                  "tools/preprocess_data.py --multimodal (docs/MULTIMODAL.md)") from None
        self.prefix = prefix
        self.text = IndexedDataset(prefix + TEXT_SUFFIX)
        self.mask = IndexedDataset(prefix + MASK_SUFFIX)
        self.images = IndexedDataset(prefix + IMAGES_SUFFIX)
        self.image_docs = self.images.document_indices  # record r owns images [docs[r], docs[r+1])
        if not len(self.text) == len(self.mask) == len(self.image_docs) - 1:
            raise ConfigError(f"data.prefix: '{prefix}' datasets disagree on the record count; preprocess again")

    def __len__(self) -> int:
        return len(self.text)

    def image_bytes(self, r: int) -> list[bytes]:
        return [self.images[int(k)].tobytes() for k in range(self.image_docs[r], self.image_docs[r + 1])]


class MultimodalDataset(torch.utils.data.Dataset):
    def __init__(self, records: MultimodalRecords, record_ids: np.ndarray, processor: ImageProcessor, tokenizer,
                 seq_length: int, num_samples: int, seed: int, with_pixels: bool = True):
        self.records, self.processor, self.seq_length = records, processor, seq_length
        self.with_pixels = with_pixels  # False on pipeline stages after the first: no ViT there
        self.ids = {t: tokenizer.special_ids[t] for t in ("<image>", "<img_start>", "<img_end>")}
        self.pad = tokenizer.pad
        rng = np.random.RandomState(seed)
        epochs = -(-num_samples // len(record_ids))
        self.order = np.concatenate([rng.permutation(record_ids) for _ in range(epochs)])[:num_samples]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, idx: int) -> dict:
        r = int(self.order[idx])
        where = f"record {r} of '{self.records.prefix}'"
        blobs = self.records.image_bytes(r)
        sizes = [image_size(b, f"{where}: image {k}") for k, b in enumerate(blobs)]
        tiles = [self.processor.num_tiles(w, h) for w, h in sizes]
        tokens, mask = expand_image_tokens(self.records.text[r].astype(np.int64), self.records.mask[r],
                                           tiles, self.processor.tokens_per_tile, self.ids, where)
        tokens, mask = self._fit(tokens, mask, where)
        sample = {"tokens": torch.from_numpy(tokens[:-1]), "labels": torch.from_numpy(tokens[1:]),
                  "loss_mask": torch.from_numpy(mask[1:].astype(np.float32)),
                  "position_ids": torch.arange(self.seq_length)}
        s = self.processor.tile
        pixels = [self.processor.tiles(open_image(b, f"{where}: image {k}"))
                  for k, b in enumerate(blobs)] if self.with_pixels else []
        sample["pixel_values"] = torch.cat(pixels) if pixels else torch.zeros(0, 3, s, s)
        sample["num_tiles"] = sum(tiles)
        return sample

    def _fit(self, tokens: np.ndarray, mask: np.ndarray, where: str):
        """Cut the text to seq_length + 1 (never inside an image block) or pad it (loss 0 on padding)."""
        n = self.seq_length + 1
        image_pos = np.flatnonzero(tokens == self.ids["<img_end>"])
        if len(image_pos) and image_pos[-1] >= self.seq_length:
            raise ImageError(f"{where}: its images need {image_pos[-1] + 1} positions, more than data.seq_length "
                             f"({self.seq_length}); raise data.seq_length or lower vision.max_tiles")
        if len(tokens) >= n:
            return tokens[:n], mask[:n]
        pad = n - len(tokens)
        return (np.concatenate([tokens, np.full(pad, self.pad, tokens.dtype)]),
                np.concatenate([mask, np.zeros(pad, mask.dtype)]))


def collate(samples: list[dict]) -> dict:
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    keys += ("document_ids",) if "document_ids" in samples[0] else ()  # packed rows (data/mm_packing.py)
    batch = {k: torch.stack([s[k] for s in samples]) for k in keys}
    batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
    batch["num_tiles"] = torch.tensor([s["num_tiles"] for s in samples])
    if "useful_tokens" in samples[0]:  # packed rows: positions that are not padding
        batch["useful_tokens"] = torch.tensor([s["useful_tokens"] for s in samples])
    return batch


def split_records(n: int, split: str) -> list[np.ndarray]:
    """Contiguous train / valid / test record ranges by the ``data.split`` weights."""
    weights = np.array([float(x) for x in split.replace("/", ",").split(",")])
    bounds = np.round(np.cumsum(np.concatenate([[0], weights / weights.sum()])) * n).astype(int)
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(3)]


def build_multimodal_datasets(cfg, tokenizer, *, num_samples, seed: int, with_pixels: bool = True):
    """(train, valid, test) MultimodalDatasets of ``cfg.data.prefix``; a split with no record is None."""
    records = MultimodalRecords(cfg.data.prefix)
    if tokenizer.special_ids.get(IMAGE) is None:
        raise ConfigError(f"data.tokenizer_model: '{tokenizer.model_path}' has no {IMAGE} token")
    processor = ImageProcessor.from_config(cfg.vision)
    out = []
    for ids, n in zip(split_records(len(records), cfg.data.split), num_samples):
        out.append(MultimodalDataset(records, ids, processor, tokenizer, cfg.data.seq_length, n, seed, with_pixels)
                   if len(ids) and n else None)
    if out[0] is None:
        raise ConfigError(f"data.split ('{cfg.data.split}') leaves no training record of {len(records)}")
    return tuple(out)
