"""Packed multimodal rows: several image-text and text records per row, a bound on tiles per row.

The stream of records. ``data.mixture`` (or ``data.prefix``) names the sources; a source is
*multimodal* when its prefix is a multimodal token dataset (PREFIX_text_document with PREFIX_images
beside it, tools/preprocess_data.py --multimodal) and *text* otherwise (an indexed text dataset;
documents longer than a row are cut into row-sized pieces, each its own record). A source's records
are its ``data.split`` share (contiguous, like data/multimodal_dataset.py) in seeded per-epoch
shuffles. How many records each source gives is data/mixture.py's ``plan_counts`` (the same rules as
text pretraining) with one change of unit: a ``weight`` is the source's share of *tokens*, so a 6:4
image-text : text mixture is ``weight: 6`` / ``weight: 4`` whatever the sources' record lengths
(weights are divided by the source's mean record length before planning record counts; ``epochs``
keep their meaning: passes over the source's records). The sources' records are interleaved evenly
(each source's k-th of n records at time (k + 1/2) / n).

Packing. The stream is cut into shuffle buffers of ``vision.pack_buffer`` records; each buffer is
packed first-fit-decreasing (longest record first, into the first row with room for both its tokens
and its tiles) into rows of ``seq_length + 1`` tokens and at most ``tiles_per_row`` tiles, and the
buffer's rows are shuffled. Why FFD in a buffer: records are known in length before they are read
(the image sizes come from their headers), FFD packs within 11/9 of the optimum number of rows, and
the buffer keeps the data order random at the scale of a buffer (a record moves at most one buffer
away from its place in the shuffled stream) while long and short records still meet. The rows are a
pure function of the configuration and the seed, computed when the dataset is built, so the loader's
``consumed_samples`` resumes the packed order exactly.

A row's batch keys (as the training loop reads them):

    tokens, labels    [s]   next-token pairs; the tail is padding
    loss_mask         [s]   the record's own loss mask (text records: every token), 0 where the label
                            belongs to the next record, 0 on padding
    position_ids      [s]   restart at 0 for every record
    document_ids      [s]   record of the row (padding: one more), for per-record attention
    pixel_values      [t, 3, S, S]   the row's tiles in record order (t <= tiles_per_row)
    num_tiles         int
    useful_tokens     int   positions holding record tokens (the rest is padding)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from megatron_bluelm.config.data import MixtureSource
from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.data.images import IMAGE, ImageError, ImageProcessor, expand_image_tokens, image_size, open_image
from megatron_bluelm.data.mixture import plan_counts
from megatron_bluelm.data.multimodal import IMAGES_SUFFIX, TEXT_SUFFIX
from megatron_bluelm.data.multimodal_dataset import MultimodalRecords, split_records

log = logging.getLogger(__name__)


def is_multimodal_prefix(prefix: str) -> bool:
    return prefix.endswith(TEXT_SUFFIX) and os.path.isfile(prefix[: -len(TEXT_SUFFIX)] + IMAGES_SUFFIX + ".idx")


def record_metadata(records: MultimodalRecords, processor: ImageProcessor, image_id: int,
                    cache_dir: str | None) -> dict:
    """Per record of ``records``: tokens after image expansion, tiles, image positions; from the image
    headers (no decoding). One pass over every record's images, so it is cached under
    ``cache_dir/mm_meta`` keyed by the datasets' files (size, mtime) and the tiling settings."""
    import hashlib

    key = hashlib.sha256(repr((os.path.abspath(records.prefix), processor, image_id)).encode())
    for suffix in (TEXT_SUFFIX, "_loss_mask_document", IMAGES_SUFFIX):
        st = os.stat(records.prefix + suffix + ".idx")
        key.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
    path = os.path.join(cache_dir, "mm_meta", key.hexdigest()[:16] + ".npz") if cache_dir else None
    if path and os.path.isfile(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    n, tpt = len(records), processor.tokens_per_tile
    meta = {k: np.zeros(n, np.int64) for k in ("length", "tiles", "image_tokens")}
    for r in range(n):
        where = f"record {r} of '{records.prefix}'"
        blobs = records.image_bytes(r)
        tiles = [processor.num_tiles(*image_size(b, f"{where}: image {i}")) for i, b in enumerate(blobs)]
        text = records.text[r]
        slots = int(np.sum(text == image_id)) if tiles else 0
        meta["image_tokens"][r] = sum(t * tpt + 2 for t in tiles)
        meta["tiles"][r] = sum(tiles)
        meta["length"][r] = len(text) - slots + meta["image_tokens"][r]
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"  # several ranks may write it: each its own file, then a rename
        np.savez(tmp, **meta)
        os.replace(tmp, path)
    return meta


class _MultimodalSource:
    """Records of one multimodal dataset: lengths after image expansion and tiles (record_metadata)."""

    def __init__(self, prefix: str, ids: np.ndarray, processor: ImageProcessor, special: dict, row: int,
                 cache_dir: str | None = None):
        self.records, self.processor, self.special, self.row = MultimodalRecords(prefix), processor, special, row
        self.name = prefix
        self.index = ids.astype(np.int64)
        self.offset = np.zeros(len(ids), np.int64)
        meta = record_metadata(self.records, processor, special[IMAGE], cache_dir)
        too_big = np.flatnonzero(meta["image_tokens"][self.index] >= row - 1)
        if len(too_big):
            r = int(self.index[too_big[0]])
            raise ImageError(f"{self._where(r)}: its images need {int(meta['image_tokens'][r])} positions, more "
                             f"than data.seq_length ({row - 1}); raise data.seq_length or lower vision.max_tiles")
        self.tiles = meta["tiles"][self.index]
        self.length = np.minimum(meta["length"][self.index], row)

    def _where(self, r: int, image: int | None = None) -> str:
        return f"record {r} of '{self.records.prefix}'" + ("" if image is None else f": image {image}")

    def read(self, r: int, offset: int, length: int, with_pixels: bool):
        where = self._where(r)
        blobs = self.records.image_bytes(r)
        tiles = [self.processor.num_tiles(*image_size(b, where)) for b in blobs]
        tokens, mask = expand_image_tokens(self.records.text[r].astype(np.int64), self.records.mask[r], tiles,
                                           self.processor.tokens_per_tile, self.special, where)
        ends = np.flatnonzero(tokens == self.special["<img_end>"])
        if len(ends) and ends[-1] >= self.row - 1:
            raise ImageError(f"{where}: its images need {ends[-1] + 1} positions, more than data.seq_length "
                             f"({self.row - 1}); raise data.seq_length or lower vision.max_tiles")
        pixels = [self.processor.tiles(open_image(b, f"{where}: image {k}")) for k, b in enumerate(blobs)]
        pixels = (torch.cat(pixels) if pixels and with_pixels else
                  torch.zeros(0, 3, self.processor.tile, self.processor.tile))
        return tokens[:length], mask[:length].astype(np.float32), pixels


class _TextSource:
    """Documents of one text dataset, cut into pieces of at most one row (pieces of < 2 tokens dropped:
    they have no next-token pair)."""

    def __init__(self, prefix: str, ids: np.ndarray, row: int, tile: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.text, self.name, self.tile = IndexedDataset(prefix), prefix, tile
        lengths = self.text.sequence_lengths[ids].astype(np.int64)
        pieces = -(-lengths // row)
        self.index = np.repeat(ids.astype(np.int64), pieces)
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)
        self.offset = (np.arange(len(self.index)) - first) * row
        self.length = np.minimum(np.repeat(lengths, pieces) - self.offset, row)
        keep = self.length >= 2
        self.index, self.offset, self.length = self.index[keep], self.offset[keep], self.length[keep]
        self.tiles = np.zeros(len(self.index), np.int64)

    def read(self, r: int, offset: int, length: int, with_pixels: bool):
        tokens = self.text.get(r, offset=offset, length=length).astype(np.int64)
        return tokens, np.ones(length, np.float32), torch.zeros(0, 3, self.tile, self.tile)


def _stream(sources, counts: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, position in the source) of every record of the mixture, evenly interleaved."""
    rng = np.random.RandomState(seed)
    src, pos, times = [], [], []
    for i, (s, n) in enumerate(zip(sources, counts)):
        size = len(s.index)
        epochs = -(-n // size) if n else 0
        order = np.concatenate([rng.permutation(size) for _ in range(epochs)])[:n] if n else np.zeros(0, np.int64)
        src.append(np.full(n, i))
        pos.append(order)
        times.append((np.arange(n) + 0.5) / max(n, 1))
    order = np.argsort(np.concatenate(times), kind="stable")
    return np.concatenate(src)[order], np.concatenate(pos)[order]


def pack_ffd(lengths: np.ndarray, tiles: np.ndarray, row_tokens: int, row_tiles: int, buffer: int,
             rng: np.random.RandomState) -> list[np.ndarray]:
    """Rows (arrays of item indices) by first-fit-decreasing within consecutive buffers of ``buffer``
    items; a row holds at most ``row_tokens`` tokens and ``row_tiles`` tiles; each buffer's rows are
    shuffled. Items must fit a row alone (checked by the caller)."""
    rows: list[np.ndarray] = []
    for start in range(0, len(lengths), buffer):
        items = np.arange(start, min(start + buffer, len(lengths)))
        items = items[np.argsort(-lengths[items], kind="stable")]
        free_tok = np.zeros(len(items), np.int64)
        free_til = np.zeros(len(items), np.int64)
        members: list[list[int]] = []
        for i in items:
            fits = np.flatnonzero((free_tok[:len(members)] >= lengths[i]) & (free_til[:len(members)] >= tiles[i]))
            b = int(fits[0]) if len(fits) else len(members)
            if b == len(members):
                members.append([])
                free_tok[b], free_til[b] = row_tokens, row_tiles
            members[b].append(int(i))
            free_tok[b] -= lengths[i]
            free_til[b] -= tiles[i]
        rows += [np.asarray(members[k]) for k in rng.permutation(len(members))]
    return rows


@dataclass
class PackingStats:
    rows: int
    records: int
    tokens: int  # record tokens in the rows (the rest of rows * (seq_length + 1) is padding)
    tiles: int
    source_tokens: list[int]
    sum_len_sq: float  # sum over the rows' records of length^2 (the attention work of the packed rows)

    def padding_fraction(self, row_tokens: int) -> float:
        return 1.0 - self.tokens / max(self.rows * row_tokens, 1)


class PackedMultimodalDataset(torch.utils.data.Dataset):
    """``num_samples`` packed rows of the mixture (module docstring)."""

    def __init__(self, sources, plan_sources: list[MixtureSource], seq_length: int, tiles_per_row: int,
                 num_samples: int, seed: int, buffer: int, pad: int, with_pixels: bool = True):
        self.sources, self.seq_length, self.pad, self.with_pixels = sources, seq_length, pad, with_pixels
        row = seq_length + 1
        for s in sources:
            over = np.flatnonzero(s.tiles > tiles_per_row)
            if len(over):
                raise ConfigError(f"vision.max_tiles_per_microbatch: {s._where(int(s.index[over[0]]))} has "
                                  f"{int(s.tiles[over[0]])} tiles, more than a row may hold ({tiles_per_row} = "
                                  "max_tiles_per_microbatch / training.micro_batch_size)")
        mean = [float(s.length.mean()) for s in sources]
        # weights are token shares: per-record weights are w / mean record length (module docstring)
        plan = [replace(p, weight=p.weight / m if p.weight is not None else None) for p, m in zip(plan_sources, mean)]
        per_epoch = [len(s.index) for s in sources]
        total = max(int(num_samples * row / max(np.average(mean, weights=per_epoch), 1.0) * 1.1) + 16, 1)
        while True:  # grow the planned record count until it fills num_samples rows (deterministic)
            counts = plan_counts(plan, per_epoch, total)
            src, pos = _stream(sources, counts, seed)
            lengths, tiles = np.zeros(len(src), np.int64), np.zeros(len(src), np.int64)
            for i, s in enumerate(sources):
                mine = src == i
                lengths[mine], tiles[mine] = s.length[pos[mine]], s.tiles[pos[mine]]
            rows = pack_ffd(lengths, tiles, row, tiles_per_row, buffer, np.random.RandomState(seed + 1))
            if len(rows) >= num_samples:
                break
            total = int(total * 1.3) + 16
        self.rows = rows[:num_samples]
        self.src, self.pos = src, pos
        used = np.concatenate(self.rows) if self.rows else np.zeros(0, np.int64)
        self.stats = PackingStats(len(self.rows), len(used), int(lengths[used].sum()), int(tiles[used].sum()),
                                  np.bincount(src[used], weights=lengths[used], minlength=len(sources))
                                  .astype(np.int64).tolist(), float(np.sum(lengths[used].astype(np.float64) ** 2)))

    def __len__(self) -> int:
        return len(self.rows)

    def records_of(self, idx: int) -> list[tuple[int, int]]:
        """(source, record index in its dataset) of each record of row ``idx``, in row order."""
        return [(int(self.src[i]), int(self.sources[self.src[i]].index[self.pos[i]])) for i in self.rows[idx]]

    def __getitem__(self, idx: int) -> dict:
        parts = []
        for i in self.rows[int(idx)]:
            s, p = self.sources[self.src[i]], self.pos[i]
            parts.append(s.read(int(s.index[p]), int(s.offset[p]), int(s.length[p]), self.with_pixels))
        return build_mm_row(parts, self.seq_length, self.pad)


def build_mm_row(parts, seq_length: int, pad: int) -> dict:
    """[(tokens, loss mask, pixels)] of the records of one row -> its batch keys (module docstring)."""
    n = seq_length + 1
    tokens = np.full(n, pad, np.int64)
    mask = np.zeros(n, np.float32)
    doc = np.full(n, len(parts), np.int64)
    pos = np.zeros(n, np.int64)
    at = 0
    for d, (t, m, _) in enumerate(parts):
        k = len(t)
        if at + k > n:
            raise ValueError(f"packed row overflows: {at} + {k} > {n} tokens")
        tokens[at:at + k], mask[at:at + k], doc[at:at + k], pos[at:at + k] = t, m, d, np.arange(k)
        at += k
    pos[at:] = np.arange(n - at)
    same = doc[1:] == doc[:-1]
    pixels = [p for _, _, p in parts]
    return {"tokens": torch.from_numpy(tokens[:-1]), "labels": torch.from_numpy(tokens[1:]),
            "loss_mask": torch.from_numpy(mask[1:] * same), "position_ids": torch.from_numpy(pos[:-1]),
            "document_ids": torch.from_numpy(doc[:-1]), "pixel_values": torch.cat(pixels),
            "num_tiles": sum(p.shape[0] for p in pixels), "useful_tokens": min(at, seq_length)}


def tiles_per_row(cfg) -> int:
    """The tile bound of one row: ``vision.max_tiles_per_microbatch`` / micro_batch_size, or, unset,
    what the tokens alone allow (every tile takes tokens_per_tile positions)."""
    v, mbs = cfg.vision, cfg.training.micro_batch_size
    if v.max_tiles_per_microbatch is None:
        return cfg.data.seq_length // v.tokens_per_tile
    return v.max_tiles_per_microbatch // mbs


def build_packed_multimodal_datasets(cfg, tokenizer, *, num_samples, seed: int, with_pixels: bool = True):
    """(train, valid, test) PackedMultimodalDatasets of the mixture; a split with no rows asked is None."""
    if tokenizer.special_ids.get(IMAGE) is None:
        raise ConfigError(f"data.tokenizer_model: '{tokenizer.model_path}' has no {IMAGE} token")
    processor = ImageProcessor.from_config(cfg.vision)
    special = {t: tokenizer.special_ids[t] for t in (IMAGE, "<img_start>", "<img_end>")}
    row = cfg.data.seq_length + 1
    plan_sources = cfg.data.sources()
    if not any(is_multimodal_prefix(s.prefix) for s in plan_sources):
        raise ConfigError("data.mixture: packed multimodal training needs at least one multimodal source "
                          f"(PREFIX{TEXT_SUFFIX} with PREFIX{IMAGES_SUFFIX} beside it)")
    out = []
    for which, n in enumerate(num_samples):
        if not n:
            out.append(None)
            continue
        sources, plans = [], []
        for s in plan_sources:
            if is_multimodal_prefix(s.prefix):
                count = len(MultimodalRecords(s.prefix))
                ids = split_records(count, cfg.data.split)[which]
                src = (_MultimodalSource(s.prefix, ids, processor, special, row, cfg.data.cache_dir)
                       if len(ids) else None)
            else:
                from megatron.core.datasets.indexed_dataset import IndexedDataset

                ids = split_records(len(IndexedDataset(s.prefix)), cfg.data.split)[which]
                src = _TextSource(s.prefix, ids, row, processor.tile) if len(ids) else None
            if src is not None and len(src.index):
                sources.append(src)
                plans.append(s)
        if not any(isinstance(s, _MultimodalSource) for s in sources):
            if which == 0:
                raise ConfigError(f"data.split ('{cfg.data.split}') leaves no training record of the "
                                  "multimodal sources")
            out.append(None)
            continue
        ds = PackedMultimodalDataset(sources, plans, cfg.data.seq_length, tiles_per_row(cfg), n, seed + which,
                                     cfg.vision.pack_buffer, tokenizer.pad, with_pixels)
        if which == 0:
            st = ds.stats
            shares = ", ".join(f"{os.path.basename(s.name)} {t / max(st.tokens, 1):.1%}"
                               for s, t in zip(sources, st.source_tokens))
            log.info("packed multimodal rows: %d rows, %d records, %.1f%% padding, %.2f tiles per row; token "
                     "shares: %s", st.rows, st.records, 100 * st.padding_fraction(row), st.tiles / max(st.rows, 1),
                     shares)
        out.append(ds)
    return tuple(out)
