"""Text-level generation: tokenizer + chat template + thinking budget around ``generate_ids``.

    gen = TextGenerator(inference_model, tokenizer)
    outs = gen.chat([[{"role": "user", "content": "reverse: a b c"}]], thinking_budget=64)

The chat template lives in ``megatron_bluelm.data.chat_template`` (one source of truth, also exported
to the HF tokenizer); a budget of 0 renders the non-thinking prompt (empty think block).

Images (a multimodal model): ``generate`` / ``chat`` take one list of images per prompt (paths or PIL
images), matched in order to the prompt's ``<image>`` placeholders, or put in front of the text (of
the last user turn, for chat) when it has none. ``inference/images.py`` expands them exactly as
training does; the prefill step runs the ViT once for the whole batch.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache

from megatron_bluelm.inference.decode_state import TokenTables
from megatron_bluelm.inference.errors import GenerationError
from megatron_bluelm.inference.generate import (
    GenerationOutput,
    GenerationRequest,
    SpecialIds,
    generate_ids,
    make_engine,
)
from megatron_bluelm.inference.images import IMAGE, PromptImages

END_TOKENS = ("</s>", "<|end|>")  # default stop tokens: end of document, end of turn


def render_prompt(messages: list, thinking: bool) -> str:
    """The chat prompt up to the open assistant turn, from the project's one chat template."""
    from megatron_bluelm.data.chat_template import render_chat

    if _takes_generation_prompt(render_chat):
        return render_chat(messages, thinking=thinking, add_generation_prompt=True)
    return render_chat(messages, thinking=thinking)


@lru_cache(maxsize=None)
def _takes_generation_prompt(render_chat) -> bool:
    return "add_generation_prompt" in inspect.signature(render_chat).parameters  # ~30 us: once, not per prompt


class TextGenerator:
    """``engine_options``: ``batcher.GenerationEngine`` settings (max_slots, cuda_graphs, check_every, ...)."""

    def __init__(self, inference_model, tokenizer, **engine_options):
        self.im, self.tok = inference_model, tokenizer
        embedding_rows = _embedding_rows(inference_model)
        if embedding_rows is not None and tokenizer.vocab_size > embedding_rows:
            raise GenerationError(f"tokenizer '{tokenizer.model_path}' has {tokenizer.vocab_size} tokens but the "
                                  f"model's embedding only {embedding_rows}: checkpoint/tokenizer mismatch")
        self.engine = make_engine(inference_model.model, inference_model.info.device, **engine_options)
        self.tables = TokenTables.from_tokenizer(tokenizer, tokenizer.vocab_size)
        s = tokenizer.special_ids
        self.ids = SpecialIds(pad=tokenizer.pad, think=s["<think>"], end_think=s["</think>"])
        self.default_stops = [s[t] for t in END_TOKENS]
        self.images = None  # text checkpoints take no images
        if getattr(inference_model, "is_multimodal", False):
            self.images = PromptImages.for_model(inference_model.cfg.vision, tokenizer, inference_model.has_vision)

    def request(self, bridge_text: str | None = None, budget_message: str = "",
                stop_tokens: Sequence[int] | None = None, **kwargs) -> GenerationRequest:
        """A request whose forced close is SFT's: ``budget_message`` + "\n</think>\n" + the bridge
        (default: the bridge SFT's budget-aware samples use), tokenized as it follows the thinking."""
        from megatron_bluelm.data.chat_template import DEFAULT_BRIDGE, budget_close_ids

        req = GenerationRequest(**kwargs)
        req.stop_token_ids = list(self.default_stops if stop_tokens is None else stop_tokens)
        bridge = DEFAULT_BRIDGE if bridge_text is None else bridge_text
        req.close_ids = budget_close_ids(self.tok, bridge, budget_message)
        return req

    def generate_ids(self, prompts: Sequence[Sequence[int]], req: GenerationRequest,
                     images: Sequence[Sequence] | None = None, on_finish=None) -> list[GenerationOutput]:
        """``images``: one list per prompt (paths or PIL images) for its ``<image>`` placeholders."""
        pixel_values, banned = None, ()
        if self.images is not None:
            banned = [self.images.ids[IMAGE]]
            images = images if images is not None else [[] for _ in prompts]
            prompts, pixel_values = self.images.expand(prompts, images, self.im.max_context)
        elif images is not None and any(images):
            raise GenerationError(f"{sum(len(i) for i in images)} image(s) given, but this model is a text decoder "
                                  "(its checkpoint has vision.preset: none); image prompts need a checkpoint of "
                                  "the multimodal stage (docs/MULTIMODAL.md)")
        image_id = self.images.ids[IMAGE] if self.images is not None else None
        return generate_ids(self.engine, prompts, req, ids=self.ids, vocab_size=self.im.vocab_size,
                            max_context=self.im.max_context, pixel_values=pixel_values, banned_ids=banned,
                            image_token_id=image_id, tables=self.tables, on_finish=on_finish)

    def generate(self, texts: Sequence[str], req: GenerationRequest,
                 images: Sequence[Sequence] | None = None, on_finish=None) -> list[GenerationOutput]:
        return self.generate_ids([self.tok.encode(t) for t in texts], req, images, on_finish)

    def chat(self, conversations: Sequence[list], req: GenerationRequest,
             images: Sequence[Sequence] | None = None, on_finish=None) -> list[GenerationOutput]:
        """Budget None: thinking, unlimited; 0: non-thinking; N: thinking, closed after N tokens."""
        budgets = req.thinking_budget
        if not isinstance(budgets, (list, tuple)):
            budgets = [budgets] * len(conversations)
        if images is not None:
            conversations = [place_images(m, len(imgs)) for m, imgs in zip(conversations, images)]
        prompts = [self.tok.encode(render_prompt(m, thinking=b != 0)) for m, b in zip(conversations, budgets)]
        return self.generate_ids(prompts, replace(req, thinking_budget=list(budgets)), images, on_finish)

    def decode(self, out: GenerationOutput) -> str:
        tokens = out.tokens[:-1] if out.finish_reason == "stop" else out.tokens
        return self.tok.decode(tokens)


def place_images(messages: list, n_images: int) -> list:
    """A conversation without any ``<image>`` gets its images in front of the last user turn."""
    if n_images == 0 or any(IMAGE in m.get("content", "") for m in messages):
        return messages
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise GenerationError(f"{n_images} image(s) for a conversation without a user turn")
    messages = [dict(m) for m in messages]
    messages[users[-1]]["content"] = IMAGE * n_images + messages[users[-1]]["content"]
    return messages


def _embedding_rows(im) -> int | None:
    emb = getattr(im.language_model, "embedding", None)
    if emb is None:
        return None
    return emb.word_embeddings.num_embeddings
