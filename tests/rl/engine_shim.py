"""Test-only stand-in for the generation engine's per-token ``logprobs`` / ``forced`` fields
(docs: /work/notes/engine_contract.md, issue #15), used ONLY while the engine does not return them.

``install()`` is a no-op once ``GenerationOutput`` has both fields: then the RL tests run against the
real engine, and the tests marked ``needs_engine_fields`` (skipped until then) run too. Delete this
file when the engine lands.

While active it wraps the generate call that rl/rollout.py makes: ``forced`` is rebuilt from the
budget bookkeeping (``forced_close`` at ``thinking_tokens``: the close then the bridge), and
``logprobs`` are recorded from the engine's own sampling step (the sampled token's log-probability
under the temperature / top-k / top-p distribution it was drawn from), sent from the last pipeline
stage to the others.
"""
from __future__ import annotations

import dataclasses

import torch


def engine_has_fields() -> bool:
    from megatron_bluelm.inference.generate import GenerationOutput

    names = {f.name for f in dataclasses.fields(GenerationOutput)}
    return {"logprobs", "forced"} <= names


def install() -> None:
    if engine_has_fields():
        return
    import megatron_bluelm.inference.generate as gen_mod
    import megatron_bluelm.rl.rollout as rollout_mod

    if getattr(rollout_mod.generate_ids, "_shim", False):
        return
    original_sample, original_generate = gen_mod.sample, rollout_mod.generate_ids
    steps: list = []

    def recording_sample(logits, params, generator):
        from megatron_bluelm.inference.sampling import filter_top_k, filter_top_p

        chosen = original_sample(logits, params, generator)
        if params.greedy:
            lp = torch.log_softmax(logits.float(), -1)
        else:
            lp = torch.log_softmax(filter_top_p(filter_top_k(logits.float() / params.temperature, params.top_k),
                                                params.top_p), -1)
        steps.append(lp.gather(-1, chosen[:, None]).squeeze(-1).cpu())
        return chosen

    def generate(runner, prompts, req, **kw):
        from megatron.core import parallel_state
        import torch.distributed as dist

        steps.clear()
        gen_mod.sample = recording_sample
        try:
            outs = original_generate(runner, prompts, req, **kw)
        finally:
            gen_mod.sample = original_sample
        width = max(len(o.tokens) for o in outs)
        table = torch.zeros(len(outs), width)
        for t, lp in enumerate(steps[:width]):
            table[:, t] = lp
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            table = table.to(runner.device)
            dist.broadcast(table, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
            table = table.cpu()
        n_forced = 1 + len(req.bridge_ids)
        for i, o in enumerate(outs):
            forced = [False] * len(o.tokens)
            if o.forced_close:
                for j in range(o.thinking_tokens, min(o.thinking_tokens + n_forced, len(o.tokens))):
                    forced[j] = True
            o.forced = forced
            o.logprobs = [0.0 if f else float(table[i, j]) for j, f in enumerate(forced)]
        return outs

    generate._shim = True
    rollout_mod.generate_ids = generate
