"""Workers of the multimodal HF export test (module level: spawned by run_distributed, each in a fresh
process with its own process group)."""
import os

from megatron_bluelm.config.data import ASSETS

IMAGES = [os.path.join(ASSETS, "images", name) for name in ("rocket_tall.jpg", "chelsea.jpg")]
PROMPT = "<|user|>\nCompare <image> with <image>.<|end|>\n<|assistant|>\n"


def train_and_save(args):
    """A short multimodal run that saves its final checkpoint (the layout comes from ``args``)."""
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.stages.multimodal import run_multimodal

    run_multimodal(load_config(None, args))


def convert(direction: str, src: str, out: str):
    from megatron_bluelm.convert.api import hf_to_megatron, megatron_to_hf

    return megatron_to_hf(src, out) if direction == "to_hf" else hf_to_megatron(src, out)


def sample(vision_cfg, tokenizer):
    """(token ids [1, s], tiles [n, 3, S, S], tiles per image) of PROMPT with IMAGES, as training sees them."""
    import numpy as np
    import torch
    from PIL import Image

    from megatron_bluelm.data.images import ImageProcessor, expand_image_tokens

    proc = ImageProcessor.from_config(vision_cfg)
    tiles = [proc.tiles(Image.open(path)) for path in IMAGES]
    ids = np.asarray(tokenizer.encode(PROMPT), dtype=np.int64)
    ids, _ = expand_image_tokens(ids, np.ones_like(ids), [len(t) for t in tiles], proc.tokens_per_tile,
                                 tokenizer.special_ids, PROMPT)
    return torch.from_numpy(ids)[None], torch.cat(tiles), [len(t) for t in tiles]


def our_logits(load: str):
    """Our multimodal model (TP1, from a checkpoint of any layout) on ``sample``: (logits [s, vocab],
    token ids, tiles, tiles per image)."""
    import torch

    from megatron_bluelm.convert import megatron_io
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.training.checkpointing import read_meta, resolve_checkpoint

    path, _ = resolve_checkpoint(load)
    cfg = megatron_io.run_config_from_meta(read_meta(path))
    tok = load_tokenizer(cfg.data.tokenizer_model)
    megatron_io.start_single_process()
    model = megatron_io.build_model(cfg, cfg.model.vocab_size or tok.vocab_size, tok.special_ids["<image>"])
    megatron_io.load_full(model, path)
    model.eval()
    ids, tiles, per_image = sample(cfg.vision, tok)
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None], None, pixel_values=tiles)
    return logits[0].float(), ids, tiles, per_image


def our_greedy(load: str, max_new_tokens: int, stop_ids: list[int]):
    """Our generation engine, greedy, on PROMPT with IMAGES from the checkpoint ``load``: the
    generated ids (the stop id included when one ended the answer)."""
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.inference.engine import TextGenerator
    from megatron_bluelm.inference.generate import GenerationRequest
    from megatron_bluelm.inference.loading import checkpoint_run_config, load_weights
    from megatron_bluelm.inference.model import build_inference_model, set_layout

    cfg = set_layout(checkpoint_run_config(load), 1, 1)  # one rank, whatever layout trained it
    tok = load_tokenizer(cfg.data.tokenizer_model)
    im = build_inference_model(cfg, tok.vocab_size, image_token_id=tok.special_ids["<image>"])
    load_weights([im.model], load)
    gen = TextGenerator(im, tok)
    (out,) = gen.generate([PROMPT], GenerationRequest(max_new_tokens=max_new_tokens, stop_token_ids=stop_ids),
                          images=[IMAGES])
    return out.tokens
