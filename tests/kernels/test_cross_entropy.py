import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _kernel_check import assert_same, rel_err, run_with_grads

from bluelm_kernels import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
    use_triton,
)


def _inputs(n, h, v, ignore_frac=0.2):
    hidden, weight = torch.randn(n, h), torch.randn(v, h) * 0.3
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < ignore_frac] = -100
    return hidden, weight, labels


def test_reference_matches_torch_cross_entropy():
    hidden, weight, labels = _inputs(20, 16, 50)
    want = F.cross_entropy(hidden.double() @ weight.double().t(), labels, reduction="none")
    assert rel_err(fused_linear_cross_entropy_ref(hidden, weight, labels), want) < 1e-6


@pytest.mark.parametrize("n,h,v,chunk", [(37, 24, 300, 16), (5, 96, 100, None), (1, 8, 7, 4)])
def test_forward_backward(n, h, v, chunk):
    hidden, weight, labels = _inputs(n, h, v)
    assert use_triton(hidden)

    def fused(a, b):
        return fused_linear_cross_entropy(a, b, labels, chunk_size=chunk)

    def ref(a, b):
        return fused_linear_cross_entropy_ref(a, b, labels)

    assert_same(fused, ref, [hidden, weight])
    want = F.cross_entropy(hidden.double() @ weight.double().t(), labels, reduction="none")
    assert rel_err(fused(hidden, weight), want) < 1e-5


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_scalar_reductions(reduction):
    hidden, weight, labels = _inputs(29, 16, 130)
    upstream = [torch.tensor(1.7, dtype=torch.float64)]
    o1, g1 = run_with_grads(lambda a, b: fused_linear_cross_entropy(
        a, b, labels, chunk_size=8, reduction=reduction), [hidden, weight], upstream)
    o2, g2 = run_with_grads(lambda a, b: F.cross_entropy(
        a @ b.t(), labels, reduction=reduction), [hidden, weight], upstream)
    assert rel_err(o1[0], o2[0]) < 1e-5
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-5


def test_all_ignored():
    hidden, weight, _ = _inputs(6, 8, 20)
    labels = torch.full((6,), -100)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(6)) and torch.equal(h.grad, torch.zeros_like(h))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loss(fn, reduction, *args, **kw):
    if fn is fused_linear_cross_entropy:
        return fn(*args, reduction=reduction, chunk_size=8, **kw)
    loss = fn(*args, **kw)
    return loss.sum() if reduction == "sum" else loss


def _tp_rank(rank, world, port, reduction):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(1)  # same inputs on every rank
        hidden, weight, labels = _inputs(23, 16, 2 * 70)
        assert use_triton(hidden)
        upstream = [torch.randn(23 if reduction == "none" else (), dtype=torch.float64)]
        # The 1-rank reference: full vocab, no group.
        o_ref, g_ref = run_with_grads(
            lambda a, b: _loss(fused_linear_cross_entropy_ref, reduction, a, b, labels),
            [hidden, weight], upstream)
        shard = weight.chunk(world)[rank]
        for fn in (fused_linear_cross_entropy, fused_linear_cross_entropy_ref):
            o, g = run_with_grads(
                lambda a, b, fn=fn: _loss(fn, reduction, a, b, labels, tp_group=dist.group.WORLD),
                [hidden, shard], upstream)
            assert rel_err(o[0], o_ref[0]) < 1e-5, (fn.__name__, rank, "loss")
            assert rel_err(g[0], g_ref[0]) < 1e-5, (fn.__name__, rank, "grad_hidden")
            assert rel_err(g[1], g_ref[1].chunk(world)[rank]) < 1e-5, (fn.__name__, "grad_w")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_tensor_parallel_two_ranks(reduction):
    mp.spawn(_tp_rank, args=(2, _free_port(), reduction), nprocs=2, join=True)


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16])
def test_scaled_accumulate_adds_grad_times_the_device_scale(gdtype):
    from bluelm_kernels.cross_entropy import scaled_accumulate_

    g = torch.Generator().manual_seed(0)
    acc = torch.randn(37, 19, generator=g)  # not a multiple of the block: the masked tail
    grad = torch.randn(37, 19, generator=g).to(gdtype)
    scale = torch.tensor(0.37)
    want = acc + grad.float() * 0.37
    ptr = acc.data_ptr()
    scaled_accumulate_(acc, grad, scale)
    assert acc.data_ptr() == ptr
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="scale of one element"):
        scaled_accumulate_(acc, grad, torch.ones(2))


def test_weight_grad_to_receives_the_unscaled_gradient():
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    labels = torch.tensor([1, 2, -100, 4, 5, 10])
    seen = []

    def sink(grad_w, grad_out):
        seen.append((grad_w.clone(), grad_out.clone()))
        return grad_w * grad_out

    (fused_linear_cross_entropy(h, w, labels, reduction="sum", weight_grad_to=sink) * 3.0).backward()
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (fused_linear_cross_entropy(ref_h, ref_w, labels, reduction="sum") * 3.0).backward()
    assert len(seen) == 1 and float(seen[0][1]) == 3.0
    torch.testing.assert_close(w.grad, ref_w.grad)
    torch.testing.assert_close(seen[0][0] * 3.0, ref_w.grad)
    with pytest.raises(ValueError, match="weight_grad_to needs"):
        fused_linear_cross_entropy(h, w, labels, weight_grad_to=sink)
