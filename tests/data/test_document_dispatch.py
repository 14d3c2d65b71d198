"""A packed micro-batch's document facts (bluelm_kernels.attention's DocumentLayout) are computed once and
shared by every layer, by the activation recomputation in backward, and come from the loader's CPU
ids through training's forward step."""
import torch
from distributed import run_distributed
from packed_workers import documents, packed_batch, tiny_overrides

MODES = {"none": 1, "selective": 2, "full": 2}  # recompute mode: attention calls per layer and micro-batch


def _paths_of_two_micro_batches():
    from bluelm_kernels.attention import PATHS
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.config.presets import apply_preset
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.models.init import init_decoder_
    from megatron_bluelm.parallel.setup import setup_parallel
    from megatron_bluelm.training.step import make_forward_step

    out = {}
    for recompute in MODES:
        cfg = load_config(None, tiny_overrides(["--data.reset_position_ids", "true", "--data.reset_attention_mask",
                                                "true", "--training.recompute", recompute]))
        apply_preset(cfg.model)
        if not out:
            setup_parallel(1, 1, None, 1, cfg.training.seed, "gloo")
        model = build_decoder(cfg, 8192)
        init_decoder_(model, cfg.training.seed, cfg.model.init_std, cfg.model.num_layers)
        model.train()
        forward_step = make_forward_step(torch.device("cpu"))
        PATHS.clear()
        for docs in documents():
            output, loss_func = forward_step(iter([packed_batch(docs)]), model)
            loss_func(output)[0].backward()
        out[recompute] = (dict(PATHS), cfg.model.num_layers)
    return out


def test_layout_once_per_micro_batch_across_layers_and_recompute():
    got = run_distributed(_paths_of_two_micro_batches, 1)[0]
    for recompute, calls_per_layer in MODES.items():
        paths, layers = got[recompute]
        assert layers >= 2
        assert paths["dense"] == 2 * layers * calls_per_layer, recompute  # attention ran (again when recomputed)
        assert paths["layout"] == 2, recompute  # but each micro-batch's layout was computed once
        assert "block_mask" not in paths  # CPU needs none; CUDA builds one only off the varlen path
