"""Worker functions for the packed-prefill tests (module level: run_distributed pickles them by name).

Engines over the same random tiny model (fp32): packed rows (the default), right-padded rows
(``pack_prefill=False``) and packed rows of 16 tokens (``CHUNKED``: every prompt longer than a row's
tail is cut and continues at the next row's head, against its slot's cache) and the small-prefill path
(``SMALL``: rows and length bucketed to powers of two, padding rows written nowhere)."""

# very different lengths, 1 token included (nothing to prefill); 101 prompt tokens are prefilled
MIXED = [[100 + 3 * j + n for j in range(n)] for n in (1, 7, 33, 64)]
# groups of identical prompts (an RL group's G samples share one prefill)
GROUPED = [[40 + j for j in range(40)]] * 3 + [[9, 8, 7, 6, 5]] + [[300 + 2 * j for j in range(23)]] * 2 + [[17]]
CHUNKED = {"prefill_tokens": 16}
# the small-prefill path (bucketed right-padded rows; CUDA graphs on a GPU, the same function eagerly here)
SMALL = {"small_prefill_tokens": 4096}
NEW = 8


def _engines(im):
    from megatron_bluelm.inference.generate import make_engine

    return {"packed": make_engine(im.model, im.info.device),
            "padded": make_engine(im.model, im.info.device, pack_prefill=False),
            "chunked": make_engine(im.model, im.info.device, **CHUNKED),
            "small": make_engine(im.model, im.info.device, **SMALL)}


def _last_hidden_logits(im, engine, prompts):
    """The engine's prefill alone: logits of each prompt's last prefilled position (len - 2), and
    the same logits from one full forward of the prompt minus its last token."""
    from gen_workers import _full_logits

    engine.reserve(len(prompts), 96, NEW, im.vocab_size)
    groups = [(list(p), [slot], None) for slot, p in enumerate(prompts)]
    hidden = engine._prefill(groups)
    got = {g: engine.w.logits(h[None])[0, :im.vocab_size] for g, h in hidden.items()}
    want = {g: _full_logits(im.model, list(p[:-1]))[-1, :im.vocab_size] for g, p in enumerate(prompts) if len(p) > 1}
    return sorted(got) == sorted(want), max(float((got[g] - want[g]).abs().max()) for g in want)


def packed_prefill_checks(overrides):
    from gen_workers import _expected_logprobs, _gen, _reference, _setup

    from megatron_bluelm.inference.sampling import SamplingParams

    im, _ = _setup(overrides)
    engines = _engines(im)
    res = {"reference": _reference(im, MIXED, NEW), "stats": {}, "greedy": {}, "logprobs": {}, "hidden": {},
           "grouped": {}, "group_prefill": {}}
    hot = SamplingParams(temperature=1.5, seed=3)
    for name, eng in engines.items():
        before = dict(eng.stats)
        res["greedy"][name] = [o.tokens for o in _gen(im, eng, MIXED, max_new_tokens=NEW)]
        res["stats"][name] = {k: eng.stats[k] - before[k] for k in ("prefill_tokens", "prefill_computed",
                                                                   "prefill_calls")}
        outs = _gen(im, eng, MIXED, max_new_tokens=NEW, sampling=hot)
        res["logprobs"][name] = [(o.tokens, o.logprobs, _expected_logprobs(im, p, o, hot.temperature)[0])
                                 for p, o in zip(MIXED, outs)]
        res["hidden"][name] = _last_hidden_logits(im, eng, MIXED)
        before = eng.stats["prefill_tokens"]
        res["grouped"][name] = [o.tokens for o in _gen(im, eng, GROUPED, max_new_tokens=6, sampling=hot)]
        res["group_prefill"][name] = eng.stats["prefill_tokens"] - before
    return res
