"""Generation for the BlueLM decoder and the multimodal model (image prompts) under TP / PP: a
continuous-batching engine over the training model's own parameters, decode steps in CUDA graphs.

    from megatron_bluelm.inference import build_inference_model, TextGenerator, load_weights
    im = build_inference_model(cfg, tokenizer.vocab_size); load_weights([im.model], "ckpt/")
    gen = TextGenerator(im, tokenizer)
    outs = gen.chat(conversations, gen.request(max_new_tokens=256, thinking_budget=128))

    engine = make_engine(training_chunk, device)      # colocated: RL rollouts, no weight copy
    outs = generate_ids(engine, prompt_ids, GenerationRequest(...), ids=..., vocab_size=..., max_context=...)

See docs/SFT_AND_GENERATION.md for the design.
"""
from megatron_bluelm.inference.budget import ThinkingBudget
from megatron_bluelm.inference.errors import GenerationError
from megatron_bluelm.inference.generate import (
    GenerationOutput,
    GenerationRequest,
    SpecialIds,
    generate_ids,
    make_engine,
)
from megatron_bluelm.inference.sampling import SamplingParams

__all__ = [
    "GenerationError", "GenerationOutput", "GenerationRequest", "SamplingParams", "SpecialIds",
    "TextGenerator", "ThinkingBudget", "build_inference_model", "generate_ids", "load_weights", "make_engine",
]


def __getattr__(name):  # heavy imports (megatron-core models) only when asked for
    if name == "TextGenerator":
        from megatron_bluelm.inference.engine import TextGenerator

        return TextGenerator
    if name == "build_inference_model":
        from megatron_bluelm.inference.model import build_inference_model

        return build_inference_model
    if name == "load_weights":
        from megatron_bluelm.inference.loading import load_weights

        return load_weights
    raise AttributeError(f"module 'megatron_bluelm.inference' has no attribute {name!r}")
