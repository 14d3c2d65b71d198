"""Generation over token ids: requests, outputs, checks, and the call into the engine.

    engine = make_engine(model, device)      # reads the model's own parameter tensors
    outs = generate_ids(engine, prompts, GenerationRequest(max_new_tokens=256), ids=..., vocab_size=...,
                        max_context=...)

Every rank of a model replica calls ``generate_ids`` with the same arguments and gets the same
outputs. ``batcher.GenerationEngine`` does the work (continuous batching, device-side decode);
``reference.py`` keeps the plain loop over megatron-core's own forward that the tests compare with.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_bluelm.inference.errors import GenerationError
from megatron_bluelm.inference.sampling import SamplingParams


@dataclass
class GenerationRequest:
    max_new_tokens: int | Sequence[int] = 64  # one for every sample or one per sample
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: Sequence[int] = ()
    # None: unlimited; an int for every sample or one per sample. 0 = non-thinking.
    thinking_budget: None | int | Sequence[int | None] = None
    # The forced close when a budget is spent. ``close_ids`` (the whole forced sequence, e.g.
    # ``chat_template.budget_close_ids``: "\n</think>\n" + bridge) wins; else </think> + bridge_ids.
    bridge_ids: Sequence[int] = ()
    close_ids: Sequence[int] | None = None
    # Extra sampled thinking tokens allowed past the budget while waiting for a sentence end (0: none).
    budget_grace: int = 0
    # Per-sample RNG stream ids (default: the sample's index in the call). A sample's tokens depend on
    # (sampling.seed, its id) only, so e.g. a resumed batch job regenerates exactly the missing ones.
    sample_ids: Sequence[int] | None = None


@dataclass
class GenerationOutput:
    prompt: list[int]
    tokens: list[int]  # generated ids, the stop token included when one ended the sample
    finish_reason: str  # "stop" | "length" (max_new_tokens) | "context" (context full)
    thinking_tokens: int = 0  # thinking tokens the sample generated (forced ones not counted)
    forced_close: bool = False  # the budget closed the think block
    # per generated token: log-prob under the distribution it was sampled from (0.0 where forced)
    logprobs: list[float] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)  # True: forced by the engine, not sampled
    warnings: list[str] = field(default_factory=list)  # e.g. a budget clamped to what the limits leave


@dataclass
class SpecialIds:
    pad: int
    think: int
    end_think: int


def _budgets(req: GenerationRequest, n: int) -> list[int | None]:
    b = req.thinking_budget
    budgets = list(b) if isinstance(b, (list, tuple)) else [b] * n
    if len(budgets) != n:
        raise GenerationError(f"thinking_budget: {len(budgets)} budgets for {n} prompts")
    return budgets


def close_sequence(req: GenerationRequest, ids: SpecialIds) -> list[int]:
    if req.close_ids is not None:
        close = list(req.close_ids)
        if ids.end_think not in close:
            raise GenerationError("close_ids: the forced close sequence must contain </think>")
        return close
    return [ids.end_think, *req.bridge_ids]


def check_request(prompts: Sequence[Sequence[int]], req: GenerationRequest, max_context: int,
                  forced_length: int) -> tuple[list[dict], list[list[str]]]:
    """Fail early, naming the setting; per sample its token limit and (clamped) budget."""
    req.sampling.validate()
    if not prompts:
        raise GenerationError("prompts: no prompts given")
    m = req.max_new_tokens
    max_new = list(m) if isinstance(m, (list, tuple)) else [m] * len(prompts)
    if len(max_new) != len(prompts):
        raise GenerationError(f"max_new_tokens: {len(max_new)} values for {len(prompts)} prompts")
    for v in max_new:
        if v <= 0:
            raise GenerationError(f"max_new_tokens: must be > 0, got {v}")
    if req.budget_grace < 0:
        raise GenerationError(f"budget_grace: must be >= 0, got {req.budget_grace}")
    budgets = _budgets(req, len(prompts))
    streams = list(range(len(prompts))) if req.sample_ids is None else list(req.sample_ids)
    if len(streams) != len(prompts):
        raise GenerationError(f"sample_ids: {len(streams)} ids for {len(prompts)} prompts")
    cfgs, warnings = [], []
    for i, (p, b, wanted) in enumerate(zip(prompts, budgets, max_new)):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty")
        if len(p) >= max_context:
            raise GenerationError(f"prompt {i} has {len(p)} tokens; the model's context is {max_context} "
                                  "(data.seq_length), which leaves no room to generate")
        if b is not None and b < 0:
            raise GenerationError(f"thinking_budget: must be >= 0 (0 = non-thinking), got {b}")
        room = max_context - len(p)
        limit = min(wanted, room)
        reason = 2 if wanted <= room else 3  # decode_state.FINISH_LENGTH / FINISH_CONTEXT
        notes = []
        if b is not None and b > 0 and b + forced_length > limit:
            clamped = max(0, limit - forced_length)
            by = "max_new_tokens" if reason == 2 else "the context"
            notes.append(f"thinking_budget {b} clamped to {clamped}: {by} leaves {limit} new tokens and the "
                         f"forced close takes {forced_length}")
            b = clamped
        s = req.sampling
        cfgs.append({"limit": limit, "limit_reason": reason, "budget": b, "grace": req.budget_grace,
                     "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed,
                     "sample": streams[i]})
        warnings.append(notes)
    return cfgs, warnings


def split_tiles(prompts, pixel_values: torch.Tensor | None, image_token_id: int | None):
    """The tiles of each prompt (prompt order, ``<image>`` slot counts give the split)."""
    if pixel_values is None or pixel_values.shape[0] == 0:
        return None
    if image_token_id is None:
        raise GenerationError("pixel_values given without image_token_id")
    slots = [sum(1 for t in p if t == image_token_id) for p in prompts]
    per_tile = sum(slots) // pixel_values.shape[0]
    if per_tile == 0 or per_tile * pixel_values.shape[0] != sum(slots):
        raise GenerationError(f"{pixel_values.shape[0]} tiles for {sum(slots)} <image> slots")
    out, start = [], 0
    for s in slots:
        out.append(pixel_values[start:start + s // per_tile])
        start += s // per_tile
    return out


@torch.no_grad()
def generate_ids(engine, prompts: Sequence[Sequence[int]], req: GenerationRequest, *, ids: SpecialIds,
                 vocab_size: int, max_context: int, pixel_values: torch.Tensor | None = None,
                 banned_ids: Sequence[int] = (), image_token_id: int | None = None, tables=None,
                 on_finish=None) -> list[GenerationOutput]:
    """Generate for token-id prompts with a ``GenerationEngine``. Multimodal: ``prompts`` hold the
    expanded image blocks and ``pixel_values`` their tiles (prompt order), used by the prefill only;
    ``banned_ids`` are never sampled. ``tables``: ``decode_state.TokenTables`` of the tokenizer (UTF-8
    byte roles, sentence ends) for the budget's forcing rules. ``on_finish(i, output)`` is called as
    each sample finishes (e.g. to write results while the rest still run)."""
    from megatron_bluelm.inference.runner import ModelRunner

    if isinstance(engine, ModelRunner):  # a caller holding the module runner: the engine over its model
        engine = make_engine(engine.model, engine.device)
    close = close_sequence(req, ids)
    cfgs, warnings = check_request(prompts, req, max_context, forced_length=len(close))
    tiles = split_tiles(prompts, pixel_values, image_token_id)
    outputs: list = [None] * len(prompts)

    def finished(i: int, r: dict) -> None:
        outputs[i] = _output(prompts[i], r, warnings[i])
        if on_finish is not None:
            on_finish(i, outputs[i])

    engine.generate(prompts, cfgs, ids=ids, vocab_size=vocab_size, close_ids=close,
                    stop_ids=list(req.stop_token_ids), tables=tables, banned_ids=banned_ids, tiles=tiles,
                    on_finish=finished)
    return outputs


def _output(prompt, r: dict, warnings: list[str]) -> GenerationOutput:
    return GenerationOutput(list(prompt), r["tokens"], r["finish"], thinking_tokens=r["thinking"],
                            forced_close=any(r["forced"]), logprobs=r["logprobs"], forced=r["forced"],
                            warnings=list(warnings))


def make_engine(model: torch.nn.Module, device, **options):
    """The generation engine over ``model`` (this rank's chunk; DDP-wrapped is fine)."""
    from megatron_bluelm.inference.batcher import GenerationEngine

    return GenerationEngine(model, device, **options)
