"""tools/bench/multimodal_bench.py's strict useful-FLOPs count: the output layer only where a loss is."""
import importlib.util
import os

import pytest
import torch


def _bench():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "bench", "multimodal_bench.py")
    spec = importlib.util.spec_from_file_location("multimodal_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_output_layer_counted_on_loss_positions_only():
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.config.presets import apply_preset
    from megatron_bluelm.models.counting import DecoderShape

    bench = _bench()
    cfg = load_config(None, ["--model.preset", "tiny", "--vision.preset", "vit-tiny"])
    cfg.vision.resolve()
    apply_preset(cfg.model)
    ids = torch.tensor([[0] * 100 + [1] * 50 + [2] * 106])
    mask = torch.zeros(1, 256)
    mask[0, 40:100] = 1  # 60 of the 150 record tokens have a loss (the rest: image / prompt positions)
    batch = {"document_ids": ids, "useful_tokens": torch.tensor([150]), "loss_mask": mask,
             "pixel_values": torch.zeros(2, 3, 112, 112)}
    d = DecoderShape.from_model_config(cfg.model, 8192)
    head = 6.0 * d.vocab_size * d.hidden_size
    every = bench.useful_flops(cfg, 8192, [batch])
    strict = bench.useful_flops(cfg, 8192, [batch], head_on="loss")
    assert every - strict == pytest.approx(head * (150 - 60))
    mask[0, :] = 0
    assert every - bench.useful_flops(cfg, 8192, [batch], head_on="loss") == pytest.approx(head * 150)
    with pytest.raises(ValueError, match="head_on is 'tokens' or 'loss'"):
        bench.useful_flops(cfg, 8192, [batch], head_on="all")
