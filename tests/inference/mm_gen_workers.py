"""Workers for the image-prompt generation tests (module level: run_distributed pickles them by name).

The model is the tiny decoder + vit-tiny (tiles of 112 px, 16 tokens each, up to 4 tiles + thumbnail),
randomly initialized with the layout-independent init, so every TP x PP layout holds the same model.
"""
import os

import torch

from megatron_bluelm.config.data import ASSETS, BUNDLED_TOKENIZER
from megatron_bluelm.config.loader import load_config

IMAGES = os.path.join(ASSETS, "images")
CAT, COFFEE, ASTRONAUT, TALL = (os.path.join(IMAGES, f) for f in
                                ("chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket_tall.jpg"))
# Prompts of different lengths and image counts (none too): the batch is left-padded.
TEXTS = ["<image>\nThe picture shows", "Compare <image> with <image>:", "def main("]
IMAGE_LISTS = [[CAT], [ASTRONAUT, TALL], []]


def mm_overrides(tp=1, pp=1, seq_length=256):
    return ["--data.seq_length", str(seq_length), "--model.backend", "torch", "--model.preset", "tiny",
            "--vision.preset", "vit-tiny", "--vision.max_tiles", "4",
            "--parallel.tp", str(tp), "--parallel.pp", str(pp)]


def _setup(overrides):
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.inference.engine import TextGenerator
    from megatron_bluelm.inference.model import build_inference_model

    tok = load_tokenizer(BUNDLED_TOKENIZER)
    im = build_inference_model(load_config(None, overrides), tok.vocab_size, tok.special_ids["<image>"])
    return im, TextGenerator(im, tok), tok


def _reference_greedy(im, gen, prompt, images, n):
    """No cache, no padding: the whole sequence (image tiles included) through BlueLMVLM's training
    forward at every step; the <image> token is never chosen, as in generation."""
    (seq,), tiles = gen.images.expand([prompt], [images], im.max_context)
    start, image_id = len(seq), gen.images.ids["<image>"]
    for _ in range(n):
        logits = im.model(torch.tensor([seq]), torch.arange(len(seq))[None], None, pixel_values=tiles)[0, -1]
        logits[image_id] = float("-inf")
        seq.append(int(logits[: im.vocab_size].argmax()))
    return seq[start:]


def _first_logits(gen, text, images):
    """Logits at the first generated position, through megatron-core's forward (ModelRunner, prefill only)."""
    from megatron_bluelm.inference.runner import ModelRunner

    (prompt,), tiles = gen.images.expand([gen.tok.encode(text)], [images], gen.im.max_context)
    runner = ModelRunner(gen.im.model, gen.im.info.device)
    runner.start(torch.zeros(1, dtype=torch.long), len(prompt) + 1)
    return runner.step(torch.tensor([prompt]), tiles)[0]


def mm_greedy_tokens(overrides, n=8):
    _, gen, _ = _setup(overrides)
    return [o.tokens for o in gen.generate(TEXTS, gen.request(max_new_tokens=n, stop_tokens=[]), IMAGE_LISTS)]


def _error(fn):
    from megatron_bluelm.inference.errors import GenerationError

    try:
        fn()
    except GenerationError as e:
        return str(e)
    return None


def mm_generation_checks(overrides, tmp_dir):
    from megatron_bluelm.inference.sampling import SamplingParams

    im, gen, tok = _setup(overrides)
    n = 8
    req = gen.request(max_new_tokens=n, stop_tokens=[])
    vit_calls = []
    hook = im.model.vision_model.register_forward_hook(lambda *a: vit_calls.append(a[1][0].shape[0]))
    res = {"batched": [o.tokens for o in gen.generate(TEXTS, req, IMAGE_LISTS)]}
    hook.remove()
    res["vit_calls"] = vit_calls  # tiles per ViT call during one batched generation
    res["tiles"] = [[gen.images.processor.num_tiles(*_size(p)) for p in imgs] for imgs in IMAGE_LISTS]
    res["single"] = [gen.generate([t], req, [i])[0].tokens for t, i in zip(TEXTS, IMAGE_LISTS)]
    res["reference"] = [_reference_greedy(im, gen, tok.encode(t), i, n) for t, i in zip(TEXTS, IMAGE_LISTS)]
    text = "<image>\nThe picture shows"
    res["logits"] = {"cat": _first_logits(gen, text, [CAT]), "coffee": _first_logits(gen, text, [COFFEE]),
                     "no_image": _first_logits(gen, "The picture shows", [])}

    convs = [[{"role": "user", "content": "What is in the picture?"}],
             [{"role": "user", "content": "Which is taller, <image> or <image>?"}],
             [{"role": "user", "content": "Describe <image> briefly."}]]
    chat_images = [[CAT], [ASTRONAUT, TALL], [COFFEE]]
    res["budgets"] = budgets = [0, 2, 5]
    for key, sampling in [("budget_greedy", SamplingParams()), ("budget_sampled", SamplingParams(1.0, 0, 1.0, 3))]:
        r = gen.request(max_new_tokens=12, thinking_budget=budgets, bridge_text="Answer:", stop_tokens=[],
                        sampling=sampling)
        res[key] = gen.chat(convs, r, chat_images)
    from megatron_bluelm.data.chat_template import budget_close_ids

    res["close"] = budget_close_ids(tok, "Answer:")  # what the request forces: "\n</think>\n" + bridge
    res["think"], res["end_think"] = tok.special_ids["<think>"], tok.special_ids["</think>"]

    corrupt = os.path.join(tmp_dir, "corrupt.jpg")
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    missing = os.path.join(tmp_dir, "missing.png")
    long_text = " ".join(["word"] * 200)
    res["errors"] = {
        "missing": _error(lambda: gen.generate(["<image> hi"], req, [[missing]])),
        "corrupt": _error(lambda: gen.generate(["<image> hi"], req, [[corrupt]])),
        "too_many_images": _error(lambda: gen.generate(["<image> and"], req, [[CAT, COFFEE]])),
        "too_few_images": _error(lambda: gen.generate(["<image> and <image>"], req, [[CAT]])),
        "placeholder_no_image": _error(lambda: gen.generate(["<image> and"], req)),
        "context": _error(lambda: gen.generate([long_text + " <image>"], req, [[CAT]])),
    }
    return res


def _size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def text_model_refuses_images(overrides):
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.inference.engine import TextGenerator
    from megatron_bluelm.inference.model import build_inference_model

    tok = load_tokenizer(BUNDLED_TOKENIZER)
    gen = TextGenerator(build_inference_model(load_config(None, overrides), tok.vocab_size), tok)
    return _error(lambda: gen.generate(["<image> hi"], gen.request(max_new_tokens=2), [[CAT]]))
