"""Rollouts: G sampled responses per prompt from the current policy, with our KV-cache generation
(batched, thinking mode and budget per prompt), turned into fixed-length training rows.

A row is prompt + response (stop token included), right-padded to ``seq_length``; ``loss_mask``
marks the positions whose *label* is a response token, so only generated tokens are trained.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.inference.generate import GenerationRequest, SpecialIds, generate_ids
from megatron_bluelm.inference.runner import ModelRunner
from megatron_bluelm.inference.sampling import SamplingParams


@dataclass
class Rollouts:
    records: list  # one prompt record per sample (repeated G times, group-major)
    prompts: list  # prompt token ids per sample
    responses: list  # generated ids per sample (stop token included when one ended it)
    texts: list  # decoded responses (stop token removed)
    thinking_tokens: list
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.responses)


def encode_prompt(tok, record: dict, thinking: bool) -> list[int]:
    if "messages" in record:
        from megatron_bluelm.inference.engine import render_prompt

        return tok.encode(render_prompt(record["messages"], thinking=thinking))
    return tok.encode(record["prompt"])


def generate_rollouts(runner: ModelRunner, tok, records: list, *, group_size: int, rl, seed: int,
                      vocab_size: int, max_context: int) -> Rollouts:
    samples = [r for r in records for _ in range(group_size)]
    budgets = [r.get("thinking_budget", rl.thinking_budget) for r in samples]
    prompts = [encode_prompt(tok, r, thinking=b != 0) for r, b in zip(samples, budgets)]
    s = tok.special_ids
    req = GenerationRequest(
        max_new_tokens=rl.max_new_tokens,
        sampling=SamplingParams(temperature=rl.temperature, top_p=rl.top_p, seed=seed),
        stop_token_ids=[tok.eod, s["<|end|>"]],
        thinking_budget=budgets,
    )
    ids = SpecialIds(pad=tok.pad, think=s["<think>"], end_think=s["</think>"])
    outs = generate_ids(runner, prompts, req, ids=ids, vocab_size=vocab_size, max_context=max_context)
    texts = [tok.decode(o.tokens[:-1] if o.finish_reason == "stop" else o.tokens) for o in outs]
    return Rollouts(records=samples, prompts=prompts, responses=[o.tokens for o in outs], texts=texts,
                    thinking_tokens=[o.thinking_tokens for o in outs])


def training_rows(prompts: list, completions: list, seq_length: int, pad_id: int) -> dict:
    """Rows of prompt + completion -> tokens / labels / loss_mask / position_ids [n, seq_length]."""
    n = len(prompts)
    tokens = torch.full((n, seq_length + 1), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, seq_length)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = list(p) + list(c)
        if len(row) > seq_length + 1:
            raise ConfigError(f"prompt + response of sample {i} is {len(row)} tokens > data.seq_length + 1 "
                              f"({seq_length + 1}): raise data.seq_length or lower rl.max_new_tokens")
        tokens[i, : len(row)] = torch.tensor(row)
        loss_mask[i, len(p) - 1: len(row) - 1] = 1.0  # labels at these positions are completion tokens
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": loss_mask,
            "position_ids": torch.arange(seq_length).expand(n, seq_length).contiguous(), "attention_mask": None}
