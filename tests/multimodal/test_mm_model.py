"""Adapter token order, the pipeline cost model, and the vision config checks."""
import pytest
import torch

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.config.presets import apply_preset
from megatron_bluelm.config.schema import RunConfig
from megatron_bluelm.models.adapter import pixel_unshuffle
from megatron_bluelm.models.multimodal import balanced_first_stage_layers, decoder_layer_flops, vision_flops_per_tile


def test_pixel_unshuffle_concatenates_2x2_neighbours_row_major():
    grid = 4
    x = torch.arange(grid * grid).float().view(1, grid * grid, 1)  # patch index as its feature
    out = pixel_unshuffle(x, grid)
    assert out.shape == (1, 4, 4)
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def _full(pp, seq=4096):
    cfg = RunConfig()
    cfg.model.preset, cfg.vision.preset, cfg.parallel.pp, cfg.data.seq_length = "bluelm-2.5-3b", "vit-so400m", pp, seq
    apply_preset(cfg.model)
    cfg.vision.resolve()
    return cfg


def test_cost_model_gives_the_first_stage_fewer_layers():
    cfg = _full(pp=4)
    vit = 7 * vision_flops_per_tile(cfg.vision) / decoder_layer_flops(cfg.model, 4096)
    assert 5 < vit < 7  # 6 tiles + thumbnail of SigLIP-so400m ~ 6 decoder layers of 4k tokens
    first = balanced_first_stage_layers(cfg)
    assert first == 1 and (28 - first) % 3 == 0  # 1 + ViT vs 9 per later stage: the best valid split
    assert balanced_first_stage_layers(_full(pp=2)) == 11  # 11 + ~6 vs 17
    assert balanced_first_stage_layers(_full(pp=2), tiles_per_sample=0) == 14  # no images: even split
    assert balanced_first_stage_layers(_full(pp=1)) is None


def test_vision_config_errors_name_the_field():
    cfg = RunConfig()
    cfg.vision.preset, cfg.vision.image_size = "vit-so400m", 378  # 27 x 27 patches: odd grid
    with pytest.raises(ConfigError, match=r"vision.image_size \(378\) must be a multiple of 2 x vision.patch_size"):
        cfg.vision.resolve()
    cfg = RunConfig()
    cfg.vision.preset, cfg.vision.freeze = "vit-tiny", ["vision", "adaptor"]
    with pytest.raises(ConfigError, match="vision.freeze: unknown parts"):
        cfg.vision.resolve()
    cfg = RunConfig()
    cfg.vision.preset = "vit-tiny"
    cfg.vision.resolve()
    with pytest.raises(ConfigError, match=r"vision.num_attention_heads \(4\) is not divisible by parallel.tp \(8\)"):
        cfg.vision.check(tp=8)
