"""Tiling rule, exact image-token counts, splicing and the loss mask (data/images.py)."""
import numpy as np
import pytest
from PIL import Image

from megatron_bluelm.data.images import (
    IMAGE,
    IMG_END,
    IMG_START,
    ImageError,
    ImageProcessor,
    choose_grid,
    expand_image_tokens,
)

IDS = {IMAGE: 6, IMG_START: 7, IMG_END: 8}


@pytest.mark.parametrize("size, max_tiles, grid", [
    ((100, 80), 6, (1, 1)),      # smaller than one tile: never upscaled to a grid
    ((364, 364), 6, (1, 1)),     # exactly one tile
    ((728, 364), 6, (1, 2)),     # 2:1 -> one row of two
    ((364, 1092), 6, (3, 1)),    # 1:3 -> one column of three
    ((1456, 1456), 6, (2, 2)),   # large square: the biggest square grid within 6 tiles
    ((1456, 1456), 9, (3, 3)),
    ((2000, 500), 6, (1, 4)),    # 4:1 panorama
    ((760, 560), 6, (2, 2)),     # relaxed: 2x2 keeps 92% of 2x3's effective pixels, wastes far less
])
def test_grid_rule(size, max_tiles, grid):
    assert choose_grid(*size, tile=364, max_tiles=max_tiles) == grid


def test_relaxation_prefers_less_waste_than_strict_rule():
    # Strictly the largest effective resolution is 2x3 (all 6 tiles); relaxed picks a smaller grid.
    assert choose_grid(760, 560, 364, 6, relax=1.0) == (2, 3)
    assert choose_grid(760, 560, 364, 6) == (2, 2)


def test_tiles_and_token_count_are_exact():
    proc = ImageProcessor(tile=112, patch=14, max_tiles=4, thumbnail=True)
    assert proc.tokens_per_tile == 16  # (112 / 14 / 2)^2
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (150, 320, 3), dtype=np.uint8))
    tiles = proc.tiles(image)
    rows, cols = choose_grid(320, 150, 112, 4)
    assert (rows, cols) == (1, 3)
    assert tiles.shape == (rows * cols + 1, 3, 112, 112)  # + thumbnail
    assert proc.num_tiles(320, 150) == tiles.shape[0]
    assert proc.num_tokens(320, 150) == tiles.shape[0] * 16 + 2
    assert tiles.min() >= -1.0 and tiles.max() <= 1.0
    # First tile = the left third of the resized canvas; normalization (x / 127.5 - 1).
    canvas = np.asarray(image.resize((336, 112), Image.BICUBIC)).astype(np.float32)
    np.testing.assert_allclose(tiles[0].permute(1, 2, 0).numpy(), canvas[:, :112] / 127.5 - 1, atol=1e-6)


def test_single_tile_has_no_thumbnail_and_gray_becomes_rgb():
    proc = ImageProcessor(tile=112, patch=14, max_tiles=4, thumbnail=True)
    tiles = proc.tiles(Image.new("L", (90, 90), 128))
    assert tiles.shape == (1, 3, 112, 112)


def test_splice_expands_each_placeholder_and_masks_image_tokens():
    tokens = np.array([20, 6, 21, 22, 6, 23, 3])  # text <image> text text <image> text EOD
    mask = np.ones(7, np.uint8)
    out, m = expand_image_tokens(tokens, mask, [2, 1], 4, IDS, "rec")
    first = [7] + [6] * 8 + [8]
    second = [7] + [6] * 4 + [8]
    assert out.tolist() == [20] + first + [21, 22] + second + [23, 3]
    assert m.tolist() == [1] + [0] * 10 + [1, 1] + [0] * 6 + [1, 1]
    # Labels of the image block are masked; the text right after <img_end> is learned.
    img_end = out.tolist().index(8)
    assert m[img_end] == 0 and m[img_end + 1] == 1


def test_no_placeholder_puts_images_first():
    out, m = expand_image_tokens(np.array([20, 21]), np.ones(2, np.uint8), [1], 2, IDS, "rec")
    assert out.tolist() == [7, 6, 6, 8, 20, 21] and m.tolist() == [0, 0, 0, 0, 1, 1]


def test_placeholder_count_mismatch_names_the_record():
    with pytest.raises(ImageError, match="record 5: the text has 2 <image> placeholders for 1 images"):
        expand_image_tokens(np.array([6, 6]), np.ones(2, np.uint8), [1], 2, IDS, "record 5")
