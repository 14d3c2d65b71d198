"""Workers for the SFT run tests (module level: spawned by run_distributed)."""
from megatron_bluelm.config.loader import load_config


def train_sft(config_path, overrides, pretrained=None, prompts=()):
    """Train; then (before teardown) complete ``prompts`` greedily with the trained model."""
    from megatron_bluelm.stages.sft import run_sft

    res = run_sft(load_config(config_path, overrides), pretrained,
                  collect=lambda run: _greedy(run, prompts) if prompts else None)
    return res["losses"], res["collected"]


def _greedy(run, prompts, max_new_tokens=24):
    from megatron_bluelm.data.tokenizer import load_tokenizer
    from megatron_bluelm.inference.engine import TextGenerator
    from megatron_bluelm.inference.model import InferenceModel

    tok = load_tokenizer(run.cfg.data.tokenizer_model)
    im = InferenceModel(run.model[0].module, run.cfg, run.info, tok.vocab_size)
    gen = TextGenerator(im, tok)
    outs = gen.generate_ids([tok.encode(p) for p in prompts], gen.request(max_new_tokens=max_new_tokens))
    return [o.tokens for o in outs]
