"""Generate functions for the harness: our generation engine (``TextGenerator``), on a loaded
checkpoint or on the training model itself (periodic evaluation), and an HF export through
``transformers`` (same chat template, same thinking-budget rule, a plain per-sample loop).
"""
from __future__ import annotations

from typing import Optional

from megatron_bluelm.eval.harness import Sample


class EngineGenerate:
    """``GenerateFn`` over a ``TextGenerator``: the G samples of an item are passed as G copies of its
    prompt, item-major (the engine shares their prefill)."""

    def __init__(self, text_generator, settings):
        from megatron_bluelm.inference import SamplingParams

        self.gen, self.settings = text_generator, settings
        self.bridge = settings.bridge()
        self.forced_length = 1 + len(text_generator.tok.encode(self.bridge)) if self.bridge else 1
        self._sampling = lambda seed: SamplingParams(settings.temperature, settings.top_k, settings.top_p, seed)

    def __call__(self, conversations, images, budget: Optional[int], max_new_tokens: int, seed: int,
                 samples: int) -> list:
        convs = [c for c in conversations for _ in range(samples)]
        imgs = [i for i in images for _ in range(samples)] if any(images) else None
        req = self.gen.request(bridge_text=self.bridge, max_new_tokens=max_new_tokens, thinking_budget=budget,
                               sampling=self._sampling(seed))
        outs = self.gen.chat(convs, req, imgs)
        return [Sample(self.gen.decode(o), o.thinking_tokens, len(o.tokens), o.finish_reason, o.forced_close)
                for o in outs]


class HFGenerate:
    """``GenerateFn`` over an HF export (``tools/convert_checkpoint.py mcore-to-hf``): the tokenizer's chat
    template renders the prompt (``enable_thinking``), and the budget is enforced as in our engine:
    after N thinking tokens ``</think>`` and the bridge are forced, then decoding continues. Text
    models only; one sample at a time with the KV cache (a reference path, not a fast one)."""

    def __init__(self, path: str, settings, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(device).eval()
        self.device, self.settings = device, settings
        self.bridge_ids = self.tok.encode(settings.bridge(), add_special_tokens=False) if settings.bridge() else []
        self.forced_length = 1 + len(self.bridge_ids)
        vocab = self.tok.get_vocab()
        self.think, self.end_think = vocab["<think>"], vocab["</think>"]
        self.stops = {vocab[t] for t in ("</s>", "<|end|>") if t in vocab}

    def __call__(self, conversations, images, budget, max_new_tokens, seed, samples) -> list:
        import torch

        if any(images):
            raise ValueError("HF evaluation takes text benchmarks only (image items need --checkpoint)")
        out = []
        gen = torch.Generator().manual_seed(seed)
        for messages in conversations:
            prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=budget != 0)
            ids = self.tok.encode(prompt, add_special_tokens=False)
            for _ in range(samples):
                out.append(self._one(ids, budget, max_new_tokens, gen))
        return out

    @staticmethod
    def _past(out):
        return out.past_key_values

    def _one(self, prompt: list, budget, max_new_tokens: int, gen) -> Sample:
        import torch

        from megatron_bluelm.inference.sampling import SamplingParams, sample

        s = self.settings
        params = SamplingParams(s.temperature, s.top_k, s.top_p, 0)
        thinking = budget != 0 and self.think in prompt and self.end_think not in prompt[prompt.index(self.think):]
        count, forced, new = 0, [], []
        x = torch.tensor([prompt], device=self.device)
        past, reason, closed_by_budget = None, "length", False
        with torch.no_grad():
            for _ in range(max_new_tokens):
                res = self.model(input_ids=x, past_key_values=past, use_cache=True)
                past = self._past(res)
                if thinking and not forced and budget is not None and count >= budget:
                    forced = [self.end_think, *self.bridge_ids]
                    closed_by_budget = True
                if forced:
                    tok = forced.pop(0)
                else:
                    tok = int(sample(res.logits[:, -1, :].float(), params, gen)[0])
                new.append(tok)
                if thinking:
                    if tok == self.end_think:
                        thinking = False
                    else:
                        count += 1
                if tok in self.stops and not forced:
                    reason = "stop"
                    break
                x = torch.tensor([[tok]], device=self.device)
        text = self.tok.decode(new[:-1] if reason == "stop" else new, skip_special_tokens=False)
        return Sample(text, count if budget != 0 else 0, len(new), reason, closed_by_budget)
