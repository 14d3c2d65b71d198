"""Compare an op and its reference: outputs and the gradient of every floating input."""

import torch


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def leaf_copies(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def run_with_grads(fn, inputs, upstream):
    """fn(*inputs) -> tensor or tuple; returns (outputs, grads of the float inputs)."""
    leaves = leaf_copies(*inputs)
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    loss.backward()
    return outs, [t.grad for t in leaves if t.requires_grad]


def assert_same(fn, ref, inputs, tol=1e-5):
    """Same outputs and input gradients (random upstream grads) for fn and ref."""
    outs_ref = ref(*inputs)
    outs_ref = outs_ref if isinstance(outs_ref, tuple) else (outs_ref,)
    upstream = [torch.randn(o.shape, dtype=torch.float64) for o in outs_ref]
    o1, g1 = run_with_grads(fn, inputs, upstream)
    o2, g2 = run_with_grads(ref, inputs, upstream)
    for a, b in zip(o1, o2):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) < tol, f"output rel err {rel_err(a, b)}"
    assert len(g1) == len(g2)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert a is not None and b is not None, f"missing grad for input {i}"
        assert rel_err(a, b) < tol, f"grad {i} rel err {rel_err(a, b)}"


def graph_node_types(t):
    """The type name of every node of t's autograd graph (one entry a node)."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            names.append(type(fn).__name__)
            todo += [n for n, _ in fn.next_functions]
    return names
