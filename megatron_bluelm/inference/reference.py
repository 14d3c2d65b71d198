"""The reference generation loop: megatron-core's own forward and static KV cache, one step per token.

Kept as what the tests compare the engine (``batcher.py``) with: it runs the training model's module
forward unchanged, so equal greedy tokens show that the engine's decoder math, cache and positions
are the model's. It is host-driven (a Python loop over rows each step) and not used for real work.

Batching: prompts are left-padded to the longest (see ``runner.py`` for positions and masks, which
make every row equal to its unbatched generation). Each step the last pipeline stage samples, the
tokens are broadcast over the pipeline group, and *every* rank applies the same thinking-budget
forcing and stop logic, so all ranks agree on the batch state without further messages.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bluelm.inference.budget import ThinkingBudget
from megatron_bluelm.inference.errors import GenerationError
from megatron_bluelm.inference.generate import GenerationOutput, GenerationRequest, SpecialIds, _budgets
from megatron_bluelm.inference.runner import ModelRunner
from megatron_bluelm.inference.sampling import sample


def check_request(prompts: Sequence[Sequence[int]], req: GenerationRequest, max_context: int,
                  forced_length: int) -> list[int | None]:
    """Fail early, naming the setting: empty or too long prompts, budgets that cannot be obeyed."""
    req.sampling.validate()
    if not prompts:
        raise GenerationError("prompts: no prompts given")
    if req.max_new_tokens <= 0:
        raise GenerationError(f"max_new_tokens: must be > 0, got {req.max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty")
        if len(p) >= max_context:
            raise GenerationError(f"prompt {i} has {len(p)} tokens; the model's context is {max_context}")
    budgets = _budgets(req, len(prompts))
    for b in budgets:
        if b is not None and b + forced_length > req.max_new_tokens:
            raise GenerationError(f"thinking_budget {b} + {forced_length} closing token(s) exceeds max_new_tokens")
    return budgets


def _broadcast_from_last_stage(tokens: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tokens
    dist.broadcast(tokens, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return tokens


def _left_pad(prompts, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts])
    rows = [[pad_id] * (longest - len(p)) + list(p) for p in prompts]
    return torch.tensor(rows, dtype=torch.long), pad


class _Batch:
    """Per-sample bookkeeping: outputs, finished flags, stop tokens."""

    def __init__(self, prompts, stop_ids):
        self.outputs = [GenerationOutput(list(p), [], "length") for p in prompts]
        self.done = [False] * len(prompts)
        self.stop_ids = {int(t) for t in stop_ids}

    def record(self, i: int, tok: int) -> None:
        self.outputs[i].tokens.append(tok)
        if tok in self.stop_ids:
            self.done[i] = True
            self.outputs[i].finish_reason = "stop"


@torch.no_grad()
def reference_generate_ids(runner: ModelRunner, prompts: Sequence[Sequence[int]], req: GenerationRequest, *,
                 ids: SpecialIds, vocab_size: int, max_context: int, pixel_values: torch.Tensor | None = None,
                 banned_ids: Sequence[int] = ()) -> list[GenerationOutput]:
    """Generate for a batch of token-id prompts. Every rank of the model calls it with the same
    arguments and gets the same outputs. Multimodal: ``prompts`` hold the expanded image blocks and
    ``pixel_values`` their tiles (prompt order), used by the prefill step only; ``banned_ids`` are
    never sampled (the ``<image>`` slot token, which only an image can fill)."""
    budgets = check_request(prompts, req, max_context, forced_length=1 + len(req.bridge_ids))
    budget = ThinkingBudget(ids.think, ids.end_think, budgets, req.bridge_ids)
    budget.start(prompts)
    tokens, pad = _left_pad(prompts, ids.pad)
    steps = min(req.max_new_tokens, max_context - tokens.shape[1])
    runner.start(pad, tokens.shape[1] + steps)
    # Sampling runs where the logits are (copying [batch, vocab] logits to the host every step was the
    # rollout bottleneck on GPU); every rank of a replica seeds the same generator on the same device
    # type, so they draw the same tokens.
    gen = torch.Generator(device=runner.device).manual_seed(req.sampling.seed)
    batch = _Batch(prompts, req.stop_token_ids)
    logits = runner.step(tokens, pixel_values)
    banned = list(banned_ids)
    for t in range(steps):
        chosen = torch.zeros(len(prompts), dtype=torch.long)
        if logits is not None:
            logits[:, vocab_size:] = float("-inf")  # the embedding's padding rows are no tokens
            if banned:
                logits[:, banned] = float("-inf")
            chosen = sample(logits, req.sampling, gen)
        chosen = _broadcast_from_last_stage(chosen.to(runner.device)).cpu()
        for i in range(len(prompts)):
            if batch.done[i]:
                chosen[i] = ids.pad
                continue
            forced = budget.forced_token(i)
            if forced is not None:
                chosen[i] = forced
                batch.outputs[i].forced_close |= forced == ids.end_think
            budget.update(i, int(chosen[i]))
            batch.record(i, int(chosen[i]))
        if all(batch.done) or t == steps - 1:
            break
        logits = runner.step(chosen[:, None])
    for i, out in enumerate(batch.outputs):
        out.thinking_tokens = budget.samples[i].count
        if not batch.done[i] and steps < req.max_new_tokens:
            out.finish_reason = "context"
    return batch.outputs
