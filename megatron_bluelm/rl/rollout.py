"""Rollouts: G sampled responses per prompt from the current policy through the generation engine
(continuous batching, a group's samples sharing one prefill, thinking mode and budget per prompt,
image prompts on the multimodal model), turned into
fixed-length training rows.

A row is prompt + response (stop token included), right-padded to ``seq_length``. ``loss_mask``
marks the positions whose *label* is a token the policy sampled: prompt tokens and the tokens the
engine forced (the thinking budget's close and bridge: ``GenerationOutput.forced``) are context
only, as environment tokens are. ``rollout_logp`` holds the engine's log-probability of each sampled
token under the distribution it was drawn from (``GenerationOutput.logprobs``), for the
train-inference mismatch correction (rl/loss.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_bluelm.config.errors import ConfigError
from megatron_bluelm.inference.generate import GenerationRequest, SpecialIds, generate_ids
from megatron_bluelm.inference.sampling import SamplingParams


@dataclass
class Rollouts:
    records: list  # one prompt record per sample (repeated G times, group-major)
    prompts: list  # prompt token ids per sample (image blocks expanded)
    responses: list  # generated ids per sample (stop token included when one ended it)
    texts: list  # decoded responses (stop token removed)
    thinking_tokens: list
    forced: list  # per sample, per response token: True where the engine forced it
    logprobs: Optional[list]  # per sample, per response token: rollout log-prob (None: not requested)
    finish_reasons: list
    forced_close: list
    pixel_rows: Optional[list] = None  # per sample: its image tiles [n, 3, S, S] or None (multimodal)
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.responses)


def encode_prompt(tok, record: dict, thinking: bool) -> list[int]:
    """Token ids of a record's prompt: chat ``messages`` through the chat template (generation prompt,
    thinking or not), plain ``prompt`` text as it is."""
    if "messages" in record:
        from megatron_bluelm.inference.engine import render_prompt

        messages = record["messages"]
        if record.get("images"):
            from megatron_bluelm.inference.engine import place_images

            messages = place_images(messages, len(record["images"]))
        return tok.encode(render_prompt(messages, thinking=thinking))
    text = record["prompt"]
    if record.get("images"):
        from megatron_bluelm.data.images import IMAGE

        if IMAGE not in text:  # training's rule: images without placeholders go in front
            text = IMAGE * len(record["images"]) + text
    return tok.encode(text)


def close_ids(tok, bridge_text, budgets) -> list[int] | None:
    """What a spent thinking budget forces (``chat_template.budget_close_ids``: "\\n</think>\\n" +
    bridge, the text SFT teaches; the bridge defaults to SFT's); None when no prompt of the call
    thinks (nothing can be forced, and a non-thinking batch needs no room for it)."""
    from megatron_bluelm.data.chat_template import budget_close_ids
    from megatron_bluelm.data.sft import DEFAULT_BRIDGE

    if not any(b != 0 for b in budgets):
        return None
    return budget_close_ids(tok, DEFAULT_BRIDGE if bridge_text is None else bridge_text)


def banned_ids(images) -> list[int]:
    """Tokens the rollouts never sample (the trainer's log-probs exclude them too): ``<image>`` on
    the multimodal model."""
    if images is None:
        return []
    from megatron_bluelm.inference.images import IMAGE

    return [images.ids[IMAGE]]


def generate_rollouts(engine, tok, records: list, *, group_size: int, rl, seed: int, vocab_size: int,
                      max_context: int, images=None, need_logprobs: bool = True, tables=None) -> Rollouts:
    """``engine``: ``inference.make_engine`` over the policy's chunk (it reads the training weights);
    ``images``: a ``PromptImages`` of the multimodal model (None for a text model); ``tables``: the
    tokenizer's ``TokenTables`` for the budget's forcing rules."""
    budgets = [r.get("thinking_budget", rl.thinking_budget) for r in records]
    prompts = [encode_prompt(tok, r, thinking=b != 0) for r, b in zip(records, budgets)]
    pixel_rows, banned, image_id = None, banned_ids(images), None
    if images is not None:
        from megatron_bluelm.inference.images import IMAGE

        image_id = images.ids[IMAGE]
        pixel_rows = []
        expanded = []
        for r, p in zip(records, prompts):
            out, tiles = images.expand([p], [r.get("images", [])], max_context)
            expanded.append(out[0])
            pixel_rows.append(tiles)
        prompts = expanded
    elif any(r.get("images") for r in records):
        raise ConfigError("rl.task: records with 'images' need the multimodal model (vision.preset, a checkpoint "
                          "of the multimodal stage)")
    samples = [r for r in records for _ in range(group_size)]
    prompts = [p for p in prompts for _ in range(group_size)]
    budgets = [b for b in budgets for _ in range(group_size)]
    if pixel_rows is not None:
        pixel_rows = [t for t in pixel_rows for _ in range(group_size)]
    s = tok.special_ids
    req = GenerationRequest(
        max_new_tokens=rl.max_new_tokens,
        sampling=SamplingParams(temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p, seed=seed),
        stop_token_ids=[tok.eod, s["<|end|>"]],
        thinking_budget=budgets,
        close_ids=close_ids(tok, rl.bridge_text, budgets),
    )
    ids = SpecialIds(pad=tok.pad, think=s["<think>"], end_think=s["</think>"])
    tiles = None
    if pixel_rows is not None and any(t is not None for t in pixel_rows):
        tiles = torch.cat([t for t in pixel_rows if t is not None])
    outs = generate_ids(engine, prompts, req, ids=ids, vocab_size=vocab_size, max_context=max_context,
                        pixel_values=tiles, banned_ids=banned, image_token_id=image_id, tables=tables)
    texts = [tok.decode(o.tokens[:-1] if o.finish_reason == "stop" else o.tokens) for o in outs]
    return Rollouts(records=samples, prompts=prompts, responses=[o.tokens for o in outs], texts=texts,
                    thinking_tokens=[o.thinking_tokens for o in outs],
                    forced=[list(o.forced) for o in outs],
                    logprobs=[list(o.logprobs) for o in outs] if need_logprobs else None,
                    finish_reasons=[o.finish_reason for o in outs],
                    forced_close=[o.forced_close for o in outs], pixel_rows=pixel_rows)


def training_rows(prompts: list, completions: list, seq_length: int, pad_id: int, *,
                  forced: Optional[list] = None, logprobs: Optional[list] = None,
                  think_ids: Optional[tuple[int, int]] = None) -> dict:
    """Rows of prompt + completion -> tokens / labels / loss_mask / position_ids [n, seq_length]
    (+ ``rollout_logp`` [n, seq_length] at the label positions when ``logprobs`` are given, and
    ``think_state`` [n, seq_length] when ``think_ids`` = (<think>, </think>) are: see ``think_states``)."""
    n = len(prompts)
    tokens = torch.full((n, seq_length + 1), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, seq_length)
    rollout_logp = torch.zeros(n, seq_length) if logprobs is not None else None
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = list(p) + list(c)
        if len(row) > seq_length + 1:
            raise ConfigError(f"prompt + response of sample {i} is {len(row)} tokens > data.seq_length + 1 "
                              f"({seq_length + 1}): raise data.seq_length or lower rl.max_new_tokens")
        tokens[i, : len(row)] = torch.tensor(row)
        start, end = len(p) - 1, len(row) - 1  # labels at these positions are completion tokens
        sampled = torch.ones(len(c))
        if forced is not None:
            if len(forced[i]) != len(c):
                raise ValueError(f"sample {i}: {len(forced[i])} forced flags for {len(c)} tokens")
            sampled = 1.0 - torch.tensor(forced[i], dtype=torch.float32)
        loss_mask[i, start:end] = sampled
        if rollout_logp is not None:
            rollout_logp[i, start:end] = torch.tensor(logprobs[i], dtype=torch.float32)
    rows = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": loss_mask,
            "position_ids": torch.arange(seq_length).expand(n, seq_length).contiguous(), "attention_mask": None}
    if rollout_logp is not None:
        rows["rollout_logp"] = rollout_logp
    if think_ids is not None:
        rows["think_state"] = think_states(rows["tokens"], *think_ids)
    return rows


def think_states(tokens: torch.Tensor, think: int, end_think: int) -> torch.Tensor:
    """The engine's thinking state (``decode_state``: 0 before ``<think>``, 1 thinking, 2 closed) when
    the label at each position was drawn, i.e. after reading ``tokens[:, :j + 1]``: the engine bans a
    second ``<think>`` from state 1 on and ``</think>`` in state 2, so the training log-probs must
    too (rl/trainer.py). ``tokens`` [n, s]; the first ``<think>`` opens, the first ``</think>`` after it
    closes."""
    opened = (tokens == think).long().cumsum(1) > 0
    closed = ((tokens == end_think) & opened).long().cumsum(1) > 0
    return opened.long() + closed.long()
