"""Fused linear + cross-entropy that never materializes the [N, V] logits.

    loss[n] = logsumexp_v(h[n] . W[v]) - h[n] . W[label[n]]      (0 where label == ignore_index)

Tokens are processed in chunks of `chunk_size` rows: each chunk's logits [c, V_local] are one
matmul, a Triton kernel reads them once for the softmax statistics (max, sum-exp, target logit,
in fp32), and the buffer is dropped. Peak extra memory is one chunk of logits instead of N x V
(plus the fp32 copy, softmax and gradient that the materialized path also keeps).

Gradients, two modes:
* reduction="none" (default; per-token loss [N], any per-token grad_output): *recompute*. The
  backward recomputes each chunk's logits, turns them in place into (softmax - onehot) * g
  (Triton), then grad_h[chunk] = dlogits @ W and grad_W += dlogits^T @ h[chunk]. Four N*V*H
  matmuls in all (the materialized path does three) but nothing of size N x V survives forward.
* reduction="sum"/"mean" (scalar loss): Liger-style *gradients in forward*. The grad_output is
  a scalar, so the gradients are computed in the forward pass with g = 1 (or 1/n_valid) and
  only scaled in backward: three matmuls, the materialized path's count. grad_W ([V_local, H] in
  weight.dtype) is then held from forward to backward.

Tensor parallel (tp_group given): W is this rank's vocab shard, rows [r*V_local, (r+1)*V_local).
Max, sum-exp and target logit are all-reduced per chunk ([c] fp32 each). In backward
grad_hidden is all-reduced over the group: exactly what megatron's column-parallel output layer
(`copy_to_tensor_model_parallel_region`: identity forward, all-reduce backward) followed by
`vocab_parallel_cross_entropy` produces. So pass the same `hidden` on every rank, not wrapped
in another region that reduces its gradient; under sequence parallelism gather it with
`gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)`.
"""

import torch
import torch.distributed as dist

from ._triton import tl, triton
from .dispatch import use_triton

# ---------------------------------------------------------------- reference (materialized)


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce backward (megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward (megatron's reduce_from_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def _vocab_start(v_local, tp_group):
    return 0 if tp_group is None else dist.get_rank(tp_group) * v_local


def fused_linear_cross_entropy_ref(hidden, weight, labels, *, ignore_index=-100, tp_group=None,
                                   chunk_size=None):
    """Materialized logits + (vocab-parallel) cross-entropy, fp32 statistics; per-token loss."""
    del chunk_size
    if tp_group is not None:
        hidden = _CopyToTP.apply(hidden, tp_group)
    logits = (hidden @ weight.t()).float()
    v_local = weight.shape[0]
    local = labels - _vocab_start(v_local, tp_group)
    in_shard = (local >= 0) & (local < v_local)
    m = logits.detach().max(-1).values
    if tp_group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - m[:, None]
    sumexp = shifted.exp().sum(-1)
    tgt = shifted.gather(1, local.clamp(0, v_local - 1)[:, None])[:, 0] * in_shard
    if tp_group is not None:
        sumexp, tgt = _ReduceFromTP.apply(sumexp, tp_group), _ReduceFromTP.apply(tgt, tp_group)
    loss = sumexp.log() - tgt
    return torch.where(labels == ignore_index, torch.zeros_like(loss), loss)


# ---------------------------------------------------------------- chunk kernels


@triton.jit
def _ce_stats_kernel(LOGITS, stride, LABELS, MAX, SUMEXP, TGT, V, v_start, ignore_index,
                     BLOCK_V: tl.constexpr):
    # One row: online max / sum-exp kept per lane, reduced once at the end.
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    m_vec = tl.full([BLOCK_V], -1e30, tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        s_vec = s_vec * tl.exp(m_vec - m_new) + tl.exp(x - m_new)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    s = tl.sum(s_vec * tl.exp(m_vec - m), axis=0)
    label = tl.load(LABELS + row)
    local = label - v_start
    hit = (local >= 0) & (local < V) & (label != ignore_index)
    t = tl.load(base + tl.where(hit, local, 0)).to(tl.float32)
    tl.store(MAX + row, m)
    tl.store(SUMEXP + row, s)
    tl.store(TGT + row, tl.where(hit, t, 0.0))


@triton.jit
def _ce_grad_kernel(LOGITS, stride, LABELS, LSE, G, V, v_start, BLOCK_V: tl.constexpr):
    # In place: logits -> (softmax - onehot(label)) * g; g is 0 on ignored rows.
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    lse = tl.load(LSE + row)
    g = tl.load(G + row)
    local = tl.load(LABELS + row) - v_start
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse) - tl.where(cols == local, 1.0, 0.0)
        tl.store(base + cols, (p * g).to(LOGITS.dtype.element_ty), mask=mask)


def _stats_torch(logits, local, valid):
    lf = logits.float()
    m = lf.max(-1).values
    s = (lf - m[:, None]).exp().sum(-1)
    v = logits.shape[1]
    hit = valid & (local >= 0) & (local < v)
    t = lf.gather(1, local.clamp(0, v - 1)[:, None])[:, 0] * hit
    return m, s, t


def _grad_torch_(logits, local, lse, g):
    p = (logits.float() - lse[:, None]).exp()
    v = logits.shape[1]
    hit = (local >= 0) & (local < v)
    p[hit, local[hit]] -= 1.0
    logits.copy_(p * g[:, None])


# ---------------------------------------------------------------- chunk driver


class _Chunks:
    """Shared per-call state: shard offset, chunk bounds, and which implementation runs."""

    def __init__(self, hidden, weight, labels, ignore_index, tp_group, chunk_size):
        self.v_local = weight.shape[0]
        self.v_start = _vocab_start(self.v_local, tp_group)
        self.ignore_index, self.tp_group = ignore_index, tp_group
        self.triton = use_triton(hidden)
        n = hidden.shape[0]
        if chunk_size is None:  # rows: a power of two, <= 2^28 logits (512 MiB bf16) a chunk
            chunk_size = max(128, 1 << ((2**28 // max(self.v_local, 1)).bit_length() - 1))
        self.bounds = [(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]
        self.block_v = min(4096 if hidden.is_cuda else 64, triton.next_power_of_2(self.v_local))

    def stats(self, logits, labels, m, s, t):
        if self.triton:
            _ce_stats_kernel[(logits.shape[0],)](
                logits, logits.stride(0), labels, m, s, t, self.v_local, self.v_start,
                self.ignore_index, BLOCK_V=self.block_v, num_warps=8)
        else:
            valid = labels != self.ignore_index
            m[:], s[:], t[:] = _stats_torch(logits, labels - self.v_start, valid)

    def grad_(self, logits, labels, lse, g):
        if self.triton:
            _ce_grad_kernel[(logits.shape[0],)](
                logits, logits.stride(0), labels, lse, g, self.v_local, self.v_start,
                BLOCK_V=self.block_v, num_warps=8)
        else:
            _grad_torch_(logits, labels - self.v_start, lse, g)

    def chunk_lse(self, logits, labels):
        """lse and target logit of one chunk, fp32, all-reduced over TP."""
        c = logits.shape[0]
        m, s, t = (torch.empty(c, device=logits.device, dtype=torch.float32) for _ in range(3))
        self.stats(logits, labels, m, s, t)
        if self.tp_group is not None:
            m_glob = m.clone()
            dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=self.tp_group)
            s = s * torch.exp(m - m_glob)
            dist.all_reduce(s, group=self.tp_group)
            dist.all_reduce(t, group=self.tp_group)
            m = m_glob
        return m + torch.log(s), t

    def forward_stats(self, hidden, weight, labels):
        """Per-token lse and target logit, fp32 [N] each (logits dropped chunk by chunk)."""
        lse, tgt = (torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
                    for _ in range(2))
        for a, b in self.bounds:
            lse[a:b], tgt[a:b] = self.chunk_lse(hidden[a:b] @ weight.t(), labels[a:b])
        return lse, tgt

    def _grads_(self, dlogits, hidden_c, weight, grad_h_c, grad_w):
        torch.mm(dlogits, weight, out=grad_h_c)
        grad_w.addmm_(dlogits.t(), hidden_c)

    def backward(self, hidden, weight, labels, lse, g):
        """Recompute mode: grad_h (all-reduced over TP) and grad_W for per-token grads g."""
        grad_h, grad_w = torch.empty_like(hidden), torch.zeros_like(weight)
        for a, b in self.bounds:
            dlogits = hidden[a:b] @ weight.t()
            self.grad_(dlogits, labels[a:b], lse[a:b], g[a:b])
            self._grads_(dlogits, hidden[a:b], weight, grad_h[a:b], grad_w)
        if self.tp_group is not None:
            dist.all_reduce(grad_h, group=self.tp_group)
        return grad_h, grad_w

    def forward_with_grads(self, hidden, weight, labels, g_scale, need_grads):
        """Scalar-loss mode: one logits matmul per chunk serves the loss and the gradients."""
        lse, tgt = (torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
                    for _ in range(2))
        grad_h = torch.empty_like(hidden) if need_grads else None
        grad_w = torch.zeros_like(weight) if need_grads else None
        for a, b in self.bounds:
            logits = hidden[a:b] @ weight.t()
            lse[a:b], tgt[a:b] = self.chunk_lse(logits, labels[a:b])
            if need_grads:
                g = (labels[a:b] != self.ignore_index).float() * g_scale
                self.grad_(logits, labels[a:b], lse[a:b], g)
                self._grads_(logits, hidden[a:b], weight, grad_h[a:b], grad_w)
        if need_grads and self.tp_group is not None:
            dist.all_reduce(grad_h, group=self.tp_group)
        return lse, tgt, grad_h, grad_w


@triton.jit
def _scaled_accumulate_kernel(ACC, G, SCALE, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    scale = tl.load(SCALE).to(tl.float32)
    acc = tl.load(ACC + offs, mask=m)
    g = tl.load(G + offs, mask=m).to(tl.float32)
    tl.store(ACC + offs, (acc.to(tl.float32) + g * scale).to(ACC.dtype.element_ty), mask=m)


def scaled_accumulate_(acc: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor) -> None:
    """``acc += grad * scale`` in fp32 (``acc`` contiguous, e.g. an fp32 ``main_grad``; ``grad`` of its
    shape in any float dtype; ``scale`` a one-element device tensor, read on the device, not the host):
    one vectorized pass. PyTorch runs ``acc.add_(grad * scale)`` as two passes, the mixed-dtype add and
    the 0-dim-tensor multiply both as unvectorized broadcast kernels."""
    if acc.shape != grad.shape or not acc.is_contiguous() or scale.numel() != 1:
        raise ValueError(f"scaled_accumulate_: acc {tuple(acc.shape)} (contiguous), grad {tuple(grad.shape)}, "
                         f"scale of one element ({scale.numel()})")
    if not use_triton(acc):
        acc.add_(grad.to(torch.float32) * scale.to(torch.float32).reshape(()))
        return
    grad = grad.contiguous()
    block = 4096 if acc.is_cuda else 256
    _scaled_accumulate_kernel[(triton.cdiv(acc.numel(), block),)](acc, grad, scale, acc.numel(), BLOCK=block,
                                                                   num_warps=8 if acc.is_cuda else 1)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, tp_group, chunk_size, reduction, weight_grad_to):
        hidden, labels = hidden.contiguous(), labels.contiguous()
        ch = _Chunks(hidden, weight, labels, ignore_index, tp_group, chunk_size)
        valid = labels != ignore_index
        ctx.reduction, ctx.weight_grad_to = reduction, weight_grad_to
        if reduction == "none":
            lse, tgt = ch.forward_stats(hidden, weight, labels)
            ctx.ch = ch
            ctx.save_for_backward(hidden, weight, labels, lse)
            return torch.where(valid, lse - tgt, 0.0)
        scale = 1.0 if reduction == "sum" else 1.0 / valid.sum().clamp(min=1)
        # No gradient work under no_grad or for frozen inputs.
        lse, tgt, grad_h, grad_w = ch.forward_with_grads(
            hidden, weight, labels, scale, need_grads=any(ctx.needs_input_grad[:2]))
        ctx.save_for_backward(grad_h, grad_w)
        return torch.where(valid, lse - tgt, 0.0).sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction != "none":
            grad_h, grad_w = ctx.saved_tensors
            if ctx.weight_grad_to is not None and ctx.needs_input_grad[1]:
                return (grad_h * grad_out.to(grad_h.dtype), ctx.weight_grad_to(grad_w, grad_out),
                        None, None, None, None, None, None)
            return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), \
                None, None, None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors
        g = torch.where(labels != ctx.ch.ignore_index, grad_out.float(), 0.0).contiguous()
        grad_h, grad_w = ctx.ch.backward(hidden, weight, labels, lse, g)
        return grad_h, grad_w, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, tp_group=None,
                               chunk_size=None, reduction="none", weight_grad_to=None):
    """Cross-entropy of `hidden @ weight.T` against `labels` without the [N, V] logits.

    hidden [N, H], weight [V_local, H] (the vocab shard when tp_group is given), labels [N]
    (global ids). Returns the fp32 per-token loss [N] (0 where ignored), or its sum / mean over
    non-ignored tokens for reduction="sum"/"mean" (faster: gradients computed in forward).
    ``weight_grad_to(grad_w, grad_out) -> weight gradient for autograd`` (sum / mean only): the
    backward hands it the unscaled weight gradient and the loss's incoming gradient instead of
    returning ``grad_w * grad_out`` (training adds it into an fp32 ``main_grad`` with
    ``scaled_accumulate_``, models/fused_loss.py).
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be none|sum|mean, got {reduction!r}")
    if weight_grad_to is not None and reduction == "none":
        raise ValueError("weight_grad_to needs reduction='sum' or 'mean' (the weight gradient made in the forward)")
    return _FusedLinearCE.apply(hidden, weight, labels, ignore_index, tp_group, chunk_size,
                                reduction, weight_grad_to)
