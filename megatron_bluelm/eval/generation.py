"""Generate functions for the harness: our generation engine (``TextGenerator``), on a loaded
checkpoint or on the training model itself (periodic evaluation), and an HF export through
``transformers`` (same chat template, same forced close, same token rules, a plain per-sample loop).

Both report a sample's thinking length the same way, from its token stream: the tokens the model
*sampled* inside the think block (forced tokens of the budget's close do not count; non-thinking
prompts report 0). The harness checks budgets against this count, independent of the engine's own.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

from megatron_bluelm.eval.harness import Sample


def sampled_thinking_tokens(tokens: list, forced: list, end_think: int, thinking: bool) -> int:
    """Sampled tokens before the first ``</think>`` (all of them when the block never closed)."""
    if not thinking:
        return 0
    m = min(len(tokens), len(forced))
    try:
        end = tokens.index(end_think, 0, m)
    except ValueError:
        end = m
    return end - sum(map(bool, forced[:end]))


class EngineGenerate:
    """``GenerateFn`` over a ``TextGenerator``: the G samples of an item are passed as G copies of its
    prompt, item-major (the engine shares their prefill)."""

    def __init__(self, text_generator, settings):
        from megatron_bluelm.inference import SamplingParams

        self.gen, self.settings = text_generator, settings
        self.bridge = settings.bridge()
        probe = text_generator.request(bridge_text=self.bridge)
        close = getattr(probe, "close_ids", None)
        self.forced_length = len(close) if close else 1 + len(probe.bridge_ids)
        self._sampling = lambda seed: SamplingParams(settings.temperature, settings.top_k, settings.top_p, seed)

    def __call__(self, conversations, images, budget: Optional[int], max_new_tokens: int, seed: int,
                 samples: int, on_sample=None) -> Optional[list]:
        """``on_sample(i, make)``: called from the engine's loop as sample i finishes; ``make()``
        decodes it (the harness calls it on its row thread). Then nothing is returned."""
        convs = [c for c in conversations for _ in range(samples)]
        imgs = [i for i in images for _ in range(samples)] if any(images) else None
        req = self.gen.request(bridge_text=self.bridge, max_new_tokens=max_new_tokens, thinking_budget=budget,
                               sampling=self._sampling(seed))
        if on_sample is not None:
            self.gen.chat(convs, req, imgs, on_finish=lambda i, o: on_sample(i, partial(self.sample, o, budget)))
            return None
        return [self.sample(o, budget) for o in self.gen.chat(convs, req, imgs)]

    def sample(self, o, budget: Optional[int]) -> Sample:
        """An engine output as the harness's Sample (the text without the stop token)."""
        end_think = self.gen.ids.end_think
        return Sample(self.gen.decode(o),
                      sampled_thinking_tokens(o.tokens, o.forced or [False] * len(o.tokens), end_think, budget != 0),
                      len(o.tokens), o.finish_reason, o.forced_close, list(getattr(o, "warnings", [])))


class HFGenerate:
    """``GenerateFn`` over an HF export (``tools/convert_checkpoint.py mcore-to-hf``): the export's chat
    template renders the prompt (``enable_thinking``); the budget works as in our engine: after N
    sampled thinking tokens the close sequence (``chat_template.budget_close_ids``: "\\n</think>\\n" +
    the bridge) is forced, ``<think>`` may not be sampled while thinking nor either tag after the
    close. Greedy matches the engine token for token; sampling uses torch's generator (other draws).
    Text models only; one sample at a time with the KV cache (a reference path, not a fast one)."""

    def __init__(self, path: str, settings, device: str = "cpu"):
        import os

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from megatron_bluelm.data.chat_template import budget_close_ids
        from megatron_bluelm.data.tokenizer import load_tokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        ours = load_tokenizer(os.path.join(path, "tokenizer.model"))  # the export ships our tokenizer
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.device, self.settings, self.vocab = device, settings, ours.vocab_size
        self.close_ids = budget_close_ids(ours, settings.bridge())
        self.forced_length = len(self.close_ids)
        self.think, self.end_think = ours.special_ids["<think>"], ours.special_ids["</think>"]
        self.stops = {ours.eod, ours.special_ids["<|end|>"]}
        self.ours = ours

    def __call__(self, conversations, images, budget, max_new_tokens, seed, samples) -> list:
        import torch

        if any(images):
            raise ValueError("HF evaluation takes text benchmarks only (image items need --checkpoint)")
        out = []
        gen = torch.Generator().manual_seed(seed)
        for messages in conversations:
            prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=budget != 0)
            ids = self.ours.encode(prompt)
            for _ in range(samples):
                out.append(self._one(ids, budget, max_new_tokens, gen))
        return out

    def _one(self, prompt: list, budget, max_new_tokens: int, gen) -> Sample:
        import torch

        from megatron_bluelm.inference.sampling import SamplingParams, sample

        s = self.settings
        params = SamplingParams(s.temperature, s.top_k, s.top_p, 0)
        thinking = budget != 0 and self.think in prompt and self.end_think not in prompt[prompt.index(self.think):]
        count, queue, new, forced = 0, [], [], []
        x, past, reason, closed_by_budget = torch.tensor([prompt], device=self.device), None, "length", False
        with torch.no_grad():
            for _ in range(max_new_tokens):
                res = self.model(input_ids=x, past_key_values=past, use_cache=True)
                past = res.past_key_values
                if queue:
                    tok, was_forced = queue.pop(0), True
                else:
                    logits = res.logits[:, -1, :].float()
                    logits[:, self.vocab:] = float("-inf")  # the embedding's padding rows are no tokens
                    logits[:, self.think] = float("-inf")  # one think block per response
                    if not thinking:
                        logits[:, self.end_think] = float("-inf")
                    tok, was_forced = int(sample(logits, params, gen)[0]), False
                new.append(tok)
                forced.append(was_forced)
                if thinking:
                    if tok == self.end_think:
                        thinking = False
                    elif not was_forced:
                        count += 1
                        if budget is not None and count >= budget:
                            queue, closed_by_budget = list(self.close_ids), True
                if tok in self.stops and not was_forced:
                    reason = "stop"
                    break
                x = torch.tensor([[tok]], device=self.device)
        text = self.ours.decode(new[:-1] if reason == "stop" else new)
        return Sample(text, count if budget != 0 else 0, len(new), reason, closed_by_budget)
