"""Weight gradients accumulated straight into DDP's fp32 main_grad (training/model_setup.py
``use_fused_wgrad_accumulation``): the same gradients as megatron-core's unfused path over several
micro-batches. (The multimodal model's ViT and adapter linears take the same path: the packed-vs-alone
multimodal tests run with it.)"""
import os
import sys
from functools import partial

import torch
from distributed import run_distributed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))


def _grads(fused: bool, backend: str = "torch") -> dict:
    from packed_workers import _grads_and_loss, alone_batch, documents, tiny_overrides

    import bluelm_kernels.cross_entropy as ce
    from megatron_bluelm.config.loader import load_config
    from megatron_bluelm.data import load_tokenizer
    from megatron_bluelm.models.decoder import build_decoder
    from megatron_bluelm.parallel.setup import teardown
    from megatron_bluelm.training import model_setup
    from megatron_bluelm.training.loop import prepare_config, setup_run

    cfg = load_config(None, tiny_overrides(["--training.global_batch_size", "3"]) + ["--model.backend", backend])
    prepare_config(cfg)
    vocab = cfg.model.vocab_size or load_tokenizer(cfg.data.tokenizer_model).vocab_size
    inner, inner_ce = model_setup.wgrad_accumulate, ce.scaled_accumulate_
    counted, sunk = [], []
    ce.scaled_accumulate_ = lambda *a: (sunk.append(tuple(a[0].shape)), inner_ce(*a))[1]  # the fused loss's weight
    # count what reaches the fused GEMM: the first switch of the process installs the function it finds
    model_setup.wgrad_accumulate = lambda *a: (counted.append(tuple(a[2].shape)), inner(*a))[1]
    try:
        run = setup_run(cfg, partial(build_decoder, cfg, vocab), 0.0)  # on the CPU: unfused
        if fused:  # what wrap_ddp does on CUDA with training.fused_wgrad_accumulation
            model_setup.use_fused_wgrad_accumulation(run.model)
    finally:
        model_setup.wgrad_accumulate = inner
    try:
        switched = sum(bool(getattr(m, "gradient_accumulation_fusion", False)) for m in run.model[0].modules())
        batches = [alone_batch(d) for r in documents(3) for d in r][:3]  # three micro-batches: accumulation
        out = _grads_and_loss(run, batches)
        out.update(switched=switched, calls=len(counted), sunk=len(sunk))
        return out
    finally:
        ce.scaled_accumulate_ = inner_ce
        teardown()


def _fused_vs_unfused(backend="torch"):
    return {"fused": _grads(True, backend), "unfused": _grads(False, backend)}


def _assert_same_grads(fused, unfused):
    assert fused["tokens"] == unfused["tokens"] > 0
    assert abs(fused["loss_sum"] - unfused["loss_sum"]) < 1e-6 * abs(unfused["loss_sum"])
    assert fused["grads"].keys() == unfused["grads"].keys()
    for name, g in unfused["grads"].items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(fused["grads"][name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()), msg=name)


def test_fused_loss_weight_gradient_goes_into_main_grad():
    """The fused backend's loss (models/fused_loss.py) computes the output layer's weight gradient
    itself: with the fusion on it is added into main_grad (scaled_accumulate_, once per micro-batch),
    the same gradients as autograd + DDP's hook."""
    r = run_distributed(partial(_fused_vs_unfused, "fused"), 1)[0]
    fused, unfused = r["fused"], r["unfused"]
    assert fused["sunk"] == 3 and unfused["sunk"] == 0
    _assert_same_grads(fused, unfused)


def test_fused_accumulation_gives_the_unfused_gradients():
    r = run_distributed(_fused_vs_unfused, 1)[0]
    fused, unfused = r["fused"], r["unfused"]
    # tiny preset: 2 layers x (qkv, proj, fc1, fc2) + the untied output layer
    assert fused["switched"] >= 8 and unfused["switched"] == 0
    assert fused["calls"] >= 3 * 8 and unfused["calls"] == 0
    _assert_same_grads(fused, unfused)


def test_accumulate_adds_in_place_in_fp32():
    from megatron_bluelm.training.model_setup import wgrad_accumulate

    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(9, 5, generator=g), torch.randn(9, 4, generator=g)
    main = torch.randn(4, 5, generator=g)
    want = main + dy.t() @ x
    ptr = main.data_ptr()
    wgrad_accumulate(x.bfloat16(), dy.bfloat16(), main)
    assert main.data_ptr() == ptr and main.dtype == torch.float32
    torch.testing.assert_close(main, want, rtol=0.03, atol=0.05)
