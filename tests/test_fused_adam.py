"""megatron-core's torch Adam(W) fallback runs as torch's fused kernel (training/model_setup.py)."""
import copy
from types import SimpleNamespace

import torch

from megatron_bluelm.training.model_setup import use_fused_adam


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(37, 5, generator=g).requires_grad_(), torch.randn(11, generator=g).requires_grad_()]


def _train(params, opt, steps=3):
    for i in range(steps):
        loss = sum((p * (i + 1)).sin().sum() for p in params)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_fused_flags_and_same_updates_as_foreach():
    ref, ours = _params(0), _params(0)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=True)
    inner = torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.1)
    wrapper = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=inner)])
    use_fused_adam(wrapper)
    assert all(g["fused"] and not g["foreach"] for g in inner.param_groups)
    _train(ref, ref_opt)
    _train(ours, inner)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(s["step"].item() == 3 for s in inner.state.values())


def test_reapplied_after_loading_a_foreach_checkpoint():
    # A checkpoint saved by a foreach optimizer carries foreach flags in its param groups;
    # load_state_dict restores them, so the flags are applied again after the load.
    old = _params(1)
    old_opt = torch.optim.AdamW(old, lr=1e-2, foreach=True)
    _train(old, old_opt, steps=2)
    new = [p.detach().clone().requires_grad_() for p in old]
    opt = torch.optim.AdamW(new, lr=1e-2)
    opt.load_state_dict(copy.deepcopy(old_opt.state_dict()))  # (loading shares tensors)
    assert not opt.param_groups[0]["fused"]
    use_fused_adam(SimpleNamespace(optimizer=opt))  # a single (not chained) megatron optimizer
    assert opt.param_groups[0]["fused"] and opt.defaults["fused"]
    _train(old, old_opt, steps=1)
    _train(new, opt, steps=1)
    for a, b in zip(old, new):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_other_optimizers_are_left_alone():
    sgd = torch.optim.SGD(_params(2), lr=0.1)
    use_fused_adam(SimpleNamespace(optimizer=sgd))
    assert "fused" not in sgd.param_groups[0] or not sgd.param_groups[0]["fused"]
