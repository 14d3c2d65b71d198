"""Gradient clipping folded into torch's fused Adam(W) (training/model_setup.py use_deferred_clip): the
same updates as megatron-core's clip multiply, with clipping active, and that multiply not run."""
import os
import sys
from functools import partial

import torch
from distributed import run_distributed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))


def _train(defer: bool, clip: float) -> dict:
    from megatron.core.optimizer import clip_grads
    from packed_workers import alone_batch, documents, tiny_overrides

    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training import model_setup
    from megatron_bluelm.training.loop import prepare_config, setup_run
    from megatron_bluelm.training.step import train_step

    cfg = load_config(None, tiny_overrides(["--training.global_batch_size", "2", "--optimizer.clip_grad", str(clip),
                                            "--optimizer.lr", "1e-2"]))
    prepare_config(cfg)
    vocab = cfg.model.vocab_size or load_tokenizer(cfg.data.tokenizer_model).vocab_size
    model_setup.DEFER_CLIP = defer
    scale_calls = []
    inner = clip_grads.multi_tensor_scale_impl
    clip_grads.multi_tensor_scale_impl = lambda *a: (scale_calls.append(a[-1]), inner(*a))[1]
    try:
        torch.manual_seed(0)
        run = setup_run(cfg, partial(build_decoder, cfg, vocab), 0.0)
        batches = [alone_batch(d) for seed in (1, 2) for r in documents(seed) for d in r]  # 8 rows
        norms = []
        for i in range(3):
            it = iter(batches[2 * i:2 * i + 2])
            out = train_step(run.model, run.optimizer, run.scheduler, [it], num_microbatches=2,
                             seq_length=cfg.data.seq_length, micro_batch_size=1, device=run.info.device)
            norms.append(float(out.grad_norm))
        params = {n: p.detach().float().clone() for n, p in run.model[0].named_parameters()}
        inners = [getattr(o, "optimizer", None) for o in getattr(run.optimizer, "chained_optimizers", [run.optimizer])]
        leftover = any("grad_scale" in vars(o) for o in inners if o is not None)
        return {"params": params, "norms": norms, "scale_calls": len(scale_calls), "leftover": leftover}
    finally:
        clip_grads.multi_tensor_scale_impl = inner
        model_setup.DEFER_CLIP = True
        teardown()


def _both(clip):
    return {defer: _train(defer, clip) for defer in (True, False)}


def test_deferred_clip_gives_megatrons_updates():
    got = run_distributed(partial(_both, 1e-3), 1)[0]  # every step's norm is far above 1e-3: clipped
    deferred, ref = got[True], got[False]
    assert min(ref["norms"]) > 1e-3
    torch.testing.assert_close(deferred["norms"], ref["norms"], rtol=1e-5, atol=0)
    assert ref["scale_calls"] == 3 and deferred["scale_calls"] == 0  # megatron's multiply: only without
    assert not deferred["leftover"]  # the scale is dropped after each step
    for n, p in ref["params"].items():
        torch.testing.assert_close(deferred["params"][n], p, rtol=1e-5, atol=1e-7, msg=n)
