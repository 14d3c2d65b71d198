"""Worker functions for the generation tests (module level: run_distributed pickles them by name)."""
import torch

from megatron_bluelm.config.loader import load_config

THINK, END_THINK, PAD = 4, 5, 0
PROMPTS = [[10, 200, 300, 400, 500, 600, 700], [11, 22], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


def model_overrides(tp=1, pp=1, seq_length=96):
    return ["--data.seq_length", str(seq_length), "--model.backend", "torch",
            "--parallel.tp", str(tp), "--parallel.pp", str(pp), "--model.num_layers", "4"]


def _setup(overrides):
    from megatron_bluelm.inference.generate import make_engine
    from megatron_bluelm.inference.model import build_inference_model

    im = build_inference_model(load_config(None, overrides), 8192)
    return im, make_engine(im.model, im.info.device)


def _gen(im, runner, prompts, **kw):
    from megatron_bluelm.inference.generate import (
        GenerationRequest,
        SpecialIds,
        generate_ids,
    )

    return generate_ids(runner, prompts, GenerationRequest(**kw), ids=SpecialIds(PAD, THINK, END_THINK),
                        vocab_size=im.vocab_size, max_context=im.max_context)


def _reference_greedy(model, prompt, n):
    """No cache, no padding: the full sequence through the training forward each step."""
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]), torch.arange(len(seq))[None], None)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def greedy_tokens(overrides, prompts=PROMPTS, n=10):
    im, runner = _setup(overrides)
    return [o.tokens for o in _gen(im, runner, prompts, max_new_tokens=n)]


def generation_checks(overrides):
    from megatron_bluelm.inference.errors import GenerationError
    from megatron_bluelm.inference.sampling import SamplingParams

    im, runner = _setup(overrides)
    res = {"batched": [o.tokens for o in _gen(im, runner, PROMPTS, max_new_tokens=10)],
           "single": [_gen(im, runner, [p], max_new_tokens=10)[0].tokens for p in PROMPTS],
           "reference": [_reference_greedy(im.model, p, 10) for p in PROMPTS]}
    stop = res["single"][0][3]
    res["stopped"] = _gen(im, runner, PROMPTS[:1], max_new_tokens=10, stop_token_ids=[stop])[0]
    think_prompts = [p + [THINK] for p in PROMPTS] + [[9, THINK]]
    budgets = [0, 1, 3, 6]
    res["budget_greedy"] = _gen(im, runner, think_prompts, max_new_tokens=14, thinking_budget=budgets,
                                bridge_ids=[77, 78])
    sampled = {"max_new_tokens": 14, "thinking_budget": budgets,
                   "sampling": SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=5)}
    res["budget_sampled"] = _gen(im, runner, think_prompts, **sampled)
    res["budget_sampled_again"] = _gen(im, runner, think_prompts, **sampled)
    res["budgets"] = budgets
    res["context_full"] = _gen(im, runner, [list(range(20, 20 + im.max_context - 3))], max_new_tokens=10)[0]
    errors = {}
    for name, prompts, kw in [
        ("too_long", [list(range(20, 20 + im.max_context))], {"max_new_tokens": 4}),
        ("budget_gt_max", PROMPTS, {"max_new_tokens": 4, "thinking_budget": 8}),
        ("negative_budget", PROMPTS, {"max_new_tokens": 4, "thinking_budget": -1}),
        ("empty", [[]], {"max_new_tokens": 4}),
    ]:
        try:
            _gen(im, runner, prompts, **kw)
            errors[name] = None
        except GenerationError as e:
            errors[name] = str(e)
    res["errors"] = errors
    return res
