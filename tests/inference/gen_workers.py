"""Worker functions for the generation tests (module level: run_distributed pickles them by name).

The model is the random tiny decoder (4 layers, vocabulary 8192 = the bundled tokenizer's, whose
<think> / </think> are 4 / 5). References: ``reference.reference_generate_ids`` (megatron-core's
module forward with its static KV cache) and a full no-cache forward of the whole sequence.
"""
import torch

from megatron_bluelm.config.loader import load_config

THINK, END_THINK, PAD = 4, 5, 0
PROMPTS = [[10, 200, 300, 400, 500, 600, 700], [11, 22], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
# different lengths (1 token included: no prefill at all) for continuous batching
MANY = [[30 + i for i in range(n)] for n in (5, 1, 9, 3, 12, 2, 7)]
MANY_MAX_NEW = [6, 11, 3, 9, 5, 8, 4]
CLOSE = [77, END_THINK, 78, 79]  # a forced close sequence (like "\n</think>\n" + bridge)


def model_overrides(tp=1, pp=1, seq_length=96, precision=None, init_std=0.1):
    # init_std well above the preset's 0.02: sharper attention and logits, so that a wrong position or
    # key changes greedy tokens (at 0.02 attention is near uniform and argmax hides such bugs)
    out = ["--data.seq_length", str(seq_length), "--model.backend", "torch", "--model.init_std", str(init_std),
           "--parallel.tp", str(tp), "--parallel.pp", str(pp), "--model.num_layers", "4"]
    return out + (["--training.precision", precision] if precision else [])


def _setup(overrides, **engine_options):
    from megatron_bluelm.inference.generate import make_engine
    from megatron_bluelm.inference.model import build_inference_model

    im = build_inference_model(load_config(None, overrides), 8192)
    return im, make_engine(im.model, im.info.device, **engine_options)


def _ids():
    from megatron_bluelm.inference.generate import SpecialIds

    return SpecialIds(PAD, THINK, END_THINK)


def _gen(im, engine, prompts, **kw):
    from megatron_bluelm.inference.generate import GenerationRequest, generate_ids

    return generate_ids(engine, prompts, GenerationRequest(**kw), ids=_ids(), vocab_size=im.vocab_size,
                        max_context=im.max_context)


def _reference(im, prompts, n):
    from megatron_bluelm.inference.generate import GenerationRequest
    from megatron_bluelm.inference.reference import reference_generate_ids
    from megatron_bluelm.inference.runner import ModelRunner

    outs = reference_generate_ids(ModelRunner(im.model, im.info.device), prompts,
                                  GenerationRequest(max_new_tokens=n), ids=_ids(), vocab_size=im.vocab_size,
                                  max_context=im.max_context)
    return [o.tokens for o in outs]


def _full_logits(model, seq):
    """Logits [len(seq), V] of one unpadded sequence through the training forward (no cache)."""
    return model(torch.tensor([seq]), torch.arange(len(seq))[None], None)[0].float()


def _reference_greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(_full_logits(model, seq)[-1].argmax()))
    return seq[len(prompt):]


def greedy_tokens(overrides, prompts=PROMPTS, n=10, reference=True):
    """Engine (and megatron-core reference) greedy tokens for batched prompts of different lengths."""
    from prefill_workers import CHUNKED, MIXED

    from megatron_bluelm.inference.generate import make_engine

    im, engine = _setup(overrides)
    res = {"engine": [o.tokens for o in _gen(im, engine, prompts, max_new_tokens=n)]}
    # packed prefill in rows of 16 tokens: prompts of 1-64 tokens cut across rows and continued
    chunked = make_engine(im.model, im.info.device, **CHUNKED)
    res["mixed_chunked"] = [o.tokens for o in _gen(im, chunked, MIXED, max_new_tokens=n)]
    if reference:
        res["reference"] = _reference(im, prompts, n)
        res["mixed_reference"] = _reference(im, MIXED, n)
    return res


def parallel_greedy(tp, pp, precisions=("fp32", "bf16"), reference=False):
    """Greedy tokens of one layout per precision (several builds in one process: one spawn per layout)."""
    return {p: greedy_tokens(model_overrides(tp=tp, pp=pp, precision=p), reference=reference) for p in precisions}


def _expected_logprobs(im, prompt, out, temperature, top_k=0):
    """log_softmax(logits / T) of the generated tokens from one full forward, with the engine's masks
    (padding rows of the vocabulary; <think> while thinking / after the close, </think> after it)."""
    logits = _full_logits(im.model, list(prompt) + out.tokens)[len(prompt) - 1:len(prompt) - 1 + len(out.tokens)]
    logits[:, im.vocab_size:] = float("-inf")
    state = "thinking" if THINK in prompt and END_THINK not in prompt[prompt.index(THINK):] else "before"
    expected, in_top_k = [], []
    for j, tok in enumerate(out.tokens):
        z = logits[j].clone()
        if state != "before":
            z[THINK] = float("-inf")
        if state == "closed":
            z[END_THINK] = float("-inf")
        z = z / (temperature if temperature > 0 else 1.0)
        if top_k:
            kth = z.topk(top_k).values[-1]
            in_top_k.append(bool(z[tok] >= kth))
            z = z.masked_fill(z < kth, float("-inf"))
        expected.append(float(z.log_softmax(-1)[tok]))
        if state == "before" and tok == THINK:
            state = "thinking"
        elif state == "thinking" and tok == END_THINK:
            state = "closed"
    return expected, in_top_k


def generation_checks(overrides):
    from megatron_bluelm.inference.errors import GenerationError
    from megatron_bluelm.inference.generate import make_engine
    from megatron_bluelm.inference.sampling import SamplingParams

    im, engine = _setup(overrides)
    res = {"batched": [o.tokens for o in _gen(im, engine, PROMPTS, max_new_tokens=10)],
           "single": [_gen(im, engine, [p], max_new_tokens=10)[0].tokens for p in PROMPTS],
           "reference": _reference(im, PROMPTS, 10),
           "full_forward": [_reference_greedy(im.model, p, 10) for p in PROMPTS]}
    steps = engine.stats["decode_steps"]
    _gen(im, engine, PROMPTS, max_new_tokens=10)
    res["steps_for_10"] = engine.stats["decode_steps"] - steps
    stop = res["single"][0][3]
    res["stopped"] = _gen(im, engine, PROMPTS[:1], max_new_tokens=10, stop_token_ids=[stop])[0]

    # continuous batching: 2 slots for 7 prompts of different lengths and token limits
    small = make_engine(im.model, im.info.device, max_slots=2)
    order = []
    res["cb"] = _gen(im, small, MANY, max_new_tokens=MANY_MAX_NEW)
    res["cb_alone"] = [_gen(im, engine, [p], max_new_tokens=m)[0] for p, m in zip(MANY, MANY_MAX_NEW)]
    res["cb_slots"] = small.state.slots
    res["cb_stats"] = dict(small.stats)
    from megatron_bluelm.inference.generate import GenerationRequest, generate_ids

    generate_ids(small, MANY, GenerationRequest(max_new_tokens=MANY_MAX_NEW), ids=_ids(), vocab_size=im.vocab_size,
                 max_context=im.max_context, on_finish=lambda i, o: order.append(i))
    res["cb_finish_order"] = order

    # per-row limits: one prompt 3 tokens short of the context next to short ones
    long = list(range(20, 20 + im.max_context - 3))
    res["rows"] = _gen(im, engine, [PROMPTS[0], long, PROMPTS[1]], max_new_tokens=10)
    res["context_full"] = _gen(im, engine, [long], max_new_tokens=10)[0]

    # shared prefill: G identical prompts are prefilled once
    g_prompt = PROMPTS[2]
    before = engine.stats["prefill_tokens"]
    sampled = SamplingParams(temperature=1.5, seed=11)
    res["group"] = _gen(im, engine, [g_prompt] * 4, max_new_tokens=6, sampling=sampled)
    res["group_prefill"] = engine.stats["prefill_tokens"] - before
    res["group_prompt_len"] = len(g_prompt)

    # thinking budget in a mixed batch, greedy and hot sampling
    think_prompts = [PROMPTS[0] + [THINK], PROMPTS[1] + [THINK], PROMPTS[2] + [THINK], [9, THINK]]
    budgets = [0, 1, 3, None]
    res["budgets"] = budgets
    res["think_prompts"] = think_prompts
    res["budget_greedy"] = _gen(im, engine, think_prompts, max_new_tokens=14, thinking_budget=budgets,
                                close_ids=CLOSE)
    hot = {"max_new_tokens": 20, "thinking_budget": budgets, "close_ids": CLOSE,
           "sampling": SamplingParams(temperature=3.0, seed=5)}
    res["budget_hot"] = _gen(im, engine, think_prompts, **hot)
    res["budget_hot_again"] = _gen(im, engine, think_prompts, **hot)
    res["bridge"] = _gen(im, engine, think_prompts[:2], max_new_tokens=8, thinking_budget=2, bridge_ids=[77, 78])
    # budget larger than what max_new_tokens / the context leaves: clamped, with a warning
    res["clamped"] = _gen(im, engine, [think_prompts[0]], max_new_tokens=6, thinking_budget=8, close_ids=CLOSE)[0]
    near = list(range(20, 20 + im.max_context - 7)) + [THINK]
    res["clamped_ctx"] = _gen(im, engine, [near], max_new_tokens=30, thinking_budget=20, close_ids=CLOSE)[0]

    # log-probs against a full forward: plain temperature, greedy, top-k (one batch each)
    lp = {}
    for name, s in [("t1.5", SamplingParams(temperature=1.5, seed=2)), ("greedy", SamplingParams()),
                    ("topk", SamplingParams(temperature=1.2, top_k=5, seed=3))]:
        prompts = PROMPTS + [think_prompts[3]]
        outs = _gen(im, engine, prompts, max_new_tokens=8, sampling=s)
        lp[name] = [(o.logprobs, *_expected_logprobs(im, p, o, s.temperature, s.top_k)) for p, o in zip(prompts, outs)]
    res["logprobs"] = lp

    # seeds: reproducible, and a sample's tokens depend on (seed, index) only, not on its batch-mates
    s = SamplingParams(temperature=1.0, seed=7)
    x = PROMPTS[2]
    res["seed_a"] = _gen(im, engine, [PROMPTS[0], PROMPTS[1], x], max_new_tokens=8, sampling=s)
    res["seed_a_again"] = _gen(im, engine, [PROMPTS[0], PROMPTS[1], x], max_new_tokens=8, sampling=s)
    res["seed_b"] = _gen(im, engine, [[50, 51, 52, 53, 54, 55, 56, 57, 58, 59], [60], x], max_new_tokens=8, sampling=s)
    one = make_engine(im.model, im.info.device, max_slots=1)  # one slot: refills in another order
    res["seed_one_slot"] = _gen(im, one, [PROMPTS[0], PROMPTS[1], x], max_new_tokens=8, sampling=s)
    res["seed_other"] = _gen(im, engine, [PROMPTS[0], PROMPTS[1], x], max_new_tokens=8,
                             sampling=SamplingParams(temperature=1.0, seed=8))

    errors = {}
    for name, prompts, kw in [
        ("too_long", [list(range(20, 20 + im.max_context))], {"max_new_tokens": 4}),
        ("negative_budget", PROMPTS, {"max_new_tokens": 4, "thinking_budget": -1}),
        ("empty", [[]], {"max_new_tokens": 4}),
        ("max_new_count", PROMPTS, {"max_new_tokens": [4, 4]}),
        ("close_without_end", PROMPTS, {"max_new_tokens": 4, "thinking_budget": 1, "close_ids": [77]}),
    ]:
        try:
            _gen(im, engine, prompts, **kw)
            errors[name] = None
        except GenerationError as e:
            errors[name] = str(e)
    res["errors"] = errors
    res.update(_text_budget(im))
    return res


def _text_budget(im):
    """TextGenerator on the bundled tokenizer: the budget counts generated thinking tokens only."""
    from megatron_bluelm.config.data import BUNDLED_TOKENIZER
    from megatron_bluelm.data.chat_template import DEFAULT_BRIDGE, budget_close_ids
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.inference.engine import TextGenerator
    from megatron_bluelm.inference.sampling import SamplingParams

    tok = load_tokenizer(BUNDLED_TOKENIZER)
    gen = TextGenerator(im, tok)
    conv = [{"role": "user", "content": "reverse: a b c"}]
    req = gen.request(max_new_tokens=30, thinking_budget=[5, 0, None, 2], stop_tokens=[],
                      sampling=SamplingParams(temperature=2.0, seed=1))
    outs = gen.chat([conv] * 4, req)
    return {"text_outs": outs, "text_close": budget_close_ids(tok, DEFAULT_BRIDGE),
            "text_prompt_ends": [[tok.id_to_token(t) for t in tok.encode(p)[-2:]] for p in
                                 (_render(conv, True), _render(conv, False))]}


def _render(conv, thinking):
    from megatron_bluelm.inference.engine import render_prompt

    return render_prompt(conv, thinking)
