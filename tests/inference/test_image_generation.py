"""Generation with image prompts on the tiny multimodal model (ViT + adapter + decoder, random init):
KV-cache generation equals the full recompute, the ViT runs once per batch, the image changes the
output, the thinking budget holds, TP2 / PP2 equal TP1, and bad image prompts fail clearly."""
import pytest
import torch
from distributed import run_distributed
from mm_gen_workers import (
    CAT,
    mm_generation_checks,
    mm_greedy_tokens,
    mm_overrides,
    text_model_refuses_images,
)


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    return run_distributed(mm_generation_checks, 1, mm_overrides(), str(tmp_path_factory.mktemp("img")))[0]


def test_cached_generation_equals_full_recompute_with_images(res):
    assert res["single"] == res["reference"]


def test_batched_equals_unbatched_with_images(res):
    # rows of different lengths (5 + 4 tiles, 5 tiles, no image) left-padded into one batch
    assert res["batched"] == res["single"]


def test_vit_runs_once_per_batch_in_the_prefill(res):
    assert res["vit_calls"] == [sum(map(sum, res["tiles"]))]  # one call, every tile of the batch
    assert res["tiles"] == [[5], [5, 4], []]  # 320 x 213 -> 2 x 2 + thumbnail; 150 x 320 -> 2 x 2 (tall)


def test_the_image_influences_the_first_generated_token(res):
    logits = res["logits"]
    # same prompt tokens (both images 320 x 213), only the pixels differ
    assert (logits["cat"] - logits["coffee"]).abs().max() > 1e-2
    assert (logits["cat"] - logits["no_image"]).abs().max() > 1e-2


@pytest.mark.parametrize("key", ["budget_greedy", "budget_sampled"])
def test_budget_obeyed_with_image_prompts(res, key):
    think, end, close = res["think"], res["end_think"], res["close"]
    for out, budget in zip(res[key], res["budgets"]):
        if budget == 0:  # non-thinking prompt: the empty think block is closed in the prompt
            assert end not in out.tokens and not out.forced_close and out.thinking_tokens == 0
            continue
        # the budget counts sampled thinking tokens only (not the template's newline after <think>);
        # random weights never close by themselves: the close is the forced one, SFT's close exactly
        assert out.thinking_tokens == budget and out.forced_close
        assert out.tokens[budget:budget + len(close)] == close
        assert [i for i, f in enumerate(out.forced) if f] == list(range(budget, budget + len(close)))
        after = out.tokens[budget + len(close):]
        assert think not in after and end not in after


def test_errors_name_the_image_and_the_counts(res):
    e = res["errors"]
    assert "missing.png" in e["missing"] and "No such file" in e["missing"] and "prompt 0: image 0" in e["missing"]
    assert "corrupt.jpg" in e["corrupt"] and "cannot decode image" in e["corrupt"]
    assert "1 <image> placeholders for 2 images" in e["too_many_images"]
    assert "2 <image> placeholders for 1 images" in e["too_few_images"]
    assert "1 <image> placeholders for 0 images" in e["placeholder_no_image"]
    c = e["context"]
    assert "82 image tokens" in c and "= 283 tokens" in c and "context is 256" in c and "data.seq_length" in c


def test_text_checkpoint_refuses_images():
    from gen_workers import model_overrides

    err = run_distributed(text_model_refuses_images, 1, model_overrides())[0]
    assert err is not None and "text decoder" in err and "vision.preset: none" in err


def test_tp2_matches_tp1_with_images(res):
    results = run_distributed(mm_greedy_tokens, 2, mm_overrides(tp=2))
    assert results[0] == results[1] == res["batched"]


def test_pp2_matches_tp1_with_images(res):
    """The ViT and adapter sit on the first stage only; the last stage samples."""
    results = run_distributed(mm_greedy_tokens, 2, mm_overrides(pp=2))
    assert results[0] == results[1] == res["batched"]


def test_assign_images_over_prompts():
    from megatron_bluelm.inference.errors import GenerationError
    from megatron_bluelm.inference.images import assign_images

    assert assign_images(["a <image>", "b", "<image><image> c"], ["x", "y", "z"]) == [["x"], [], ["y", "z"]]
    assert assign_images(["no placeholder"], ["x", "y"]) == [["x", "y"]]  # in front of the text
    assert assign_images(["a", "b"], []) == [[], []]
    with pytest.raises(GenerationError, match=r"2 <image> placeholder\(s\) \(prompt 0: 1, prompt 1: 1\) but 1 image"):
        assign_images(["<image>", "<image>"], ["x"])
    with pytest.raises(GenerationError, match="without any <image> placeholder"):
        assign_images(["a", "b"], ["x"])


def test_image_tiles_are_the_training_tiles():
    """Generation runs data/images.py's processor: the same tiles the multimodal stage trains on."""
    from PIL import Image

    from megatron_bluelm.config.vision import VisionConfig
    from megatron_bluelm.data.images import ImageProcessor
    from megatron_bluelm.inference.images import PromptImages

    v = VisionConfig(preset="vit-tiny", max_tiles=4)
    v.resolve()
    ids = {"<image>": 6, "<img_start>": 7, "<img_end>": 8}
    prompts, tiles = PromptImages(ImageProcessor.from_config(v), ids).expand([[10, 6, 11]], [[CAT]], 256)
    assert prompts == [[10, 7] + [6] * 80 + [8, 11]]
    torch.testing.assert_close(tiles, ImageProcessor.from_config(v).tiles(Image.open(CAT)), rtol=0, atol=0)


def test_prefill_sharing_key_of_a_prompt_without_images():
    """A text prompt in an image batch gets an empty slice of the (channels-last) tiles: it must get a
    key (it failed with 'stride(-1) must be 1 to view Float as Byte'), equal for all empty slices."""
    import torch

    from megatron_bluelm.inference.batcher import _tile_key

    tiles = torch.rand(3, 3, 8, 8).to(memory_format=torch.channels_last)
    assert _tile_key(tiles[3:3]) == _tile_key(torch.zeros(0, 3, 8, 8))
    assert _tile_key(tiles[:1]) != _tile_key(tiles[1:2]) and _tile_key(tiles[:1]) == _tile_key(tiles[:1].clone())
