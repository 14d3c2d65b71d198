"""The gradient finalization hook: megatron-core's all-reduces, then the per-token normalisation with the
same values as megatron-core's (grad *= 1 / global tokens) without reading the count on the host."""
from types import SimpleNamespace

import pytest
import torch

from megatron_bluelm.training import step


class HostReadForbidden(torch.Tensor):
    """A device count stand-in: converting it (or anything computed from it) to a Python value raises,
    as a host read of a CUDA tensor would make the host wait for the backward."""

    def __bool__(self):
        raise AssertionError("the token count was read on the host")

    def item(self):
        raise AssertionError("the token count was read on the host")

    __float__ = __int__ = item


def _model(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    buffers = [SimpleNamespace(grad_data=torch.randn(n, generator=g)) for n in sizes]
    ddp = SimpleNamespace(overlap_grad_reduce=False, overlap_param_gather=False)
    return SimpleNamespace(config=SimpleNamespace(), ddp_config=ddp, buffers=buffers, expert_parallel_buffers=[])


def _hook(monkeypatch, model):
    calls = []
    monkeypatch.setattr(step, "finalize_model_grads", lambda m, n, **kw: calls.append((m, n)))
    monkeypatch.setattr(step.dist, "broadcast", lambda t, src, group: None)
    monkeypatch.setattr(step.dist, "all_reduce", lambda t, group=None: t.mul_(2))  # a second DP rank's tokens
    monkeypatch.setattr(step, "get_pp_last_rank", lambda group: 0)
    monkeypatch.setattr(step.parallel_state, "get_pipeline_model_parallel_group", lambda: None)
    monkeypatch.setattr(step.parallel_state, "get_data_parallel_group", lambda with_context_parallel: None)
    step.configure_model_hooks([model], SimpleNamespace(scale_loss=None))
    return model.config.finalize_model_grads_func, calls


@pytest.mark.parametrize("tokens", [37, 0])
def test_finalize_scales_like_megatron_without_a_host_read(monkeypatch, tokens):
    model = _model([1000, 333])
    before = [b.grad_data.clone() for b in model.buffers]
    hook, calls = _hook(monkeypatch, model)
    count = torch.tensor(tokens, dtype=torch.int32).as_subclass(HostReadForbidden)
    hook([model], count)
    assert len(calls) == 1 and calls[0][1] is None  # megatron-core's part runs without the count
    total = torch.tensor(2 * tokens, dtype=torch.int32)  # after the DP all-reduce
    for b, g in zip(model.buffers, before):
        want = g.clone()
        if tokens:
            want *= 1.0 / total  # megatron-core's ParamAndGradBuffer.scale_gradients
        assert torch.equal(b.grad_data, want)


def test_finalize_without_a_count_leaves_the_gradients(monkeypatch):
    model = _model([10])
    before = model.buffers[0].grad_data.clone()
    hook, calls = _hook(monkeypatch, model)
    hook([model], None)
    assert torch.equal(model.buffers[0].grad_data, before) and len(calls) == 1


def test_finalize_leaves_other_wrappers_to_their_own_scaling(monkeypatch):
    """A chunk that is not megatron-core's DDP (``buffers`` is then nn.Module's method) scales itself."""
    scaled = []

    class Wrapper(torch.nn.Module):
        config = SimpleNamespace()
        ddp_config = SimpleNamespace(overlap_grad_reduce=False, overlap_param_gather=False)

        def scale_gradients(self, s):
            scaled.append(float(s))

    chunk = Wrapper()
    hook, _ = _hook(monkeypatch, chunk)
    hook([chunk], torch.tensor(4, dtype=torch.int32))
    assert scaled == [1.0 / 8]
