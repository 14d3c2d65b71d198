"""The decoder's token embedding, its weight gradient accumulated straight into DDP's fp32 ``main_grad``.

megatron-core's ``VocabParallelEmbedding`` looks tokens up with ``F.embedding``, whose backward writes a
dense ``[vocab / tp, hidden]`` gradient in the parameter dtype every micro-batch (a zero fill, then
the scatter of the micro-batch's rows), which DDP's backward hook then adds into the fp32
``main_grad`` (``main_grad.add_(grad)``, a mixed-dtype add PyTorch runs unvectorized). For the
2.44B decoder (100k x 2560, bf16) and 8192-token micro-batches that is a 0.5 GB fill and 1.5 GB of
add traffic for 8192 rows of real gradient.

``MainGradVocabParallelEmbedding`` does the lookup through ``_LookupIntoMainGrad`` once
``gradient_accumulation_fusion`` is switched on (``training/model_setup.use_fused_wgrad_accumulation``,
the same switch as the linears' weight-gradient fusion, after DDP gave the weight a ``main_grad``):
its backward adds the micro-batch's rows into ``main_grad`` in fp32 (``accumulate_rows``), sets
``grad_added_to_main_grad`` and hands autograd an uninitialized placeholder weight gradient, as
megatron-core's fused linears do, so that DDP's hook still fires (bucket bookkeeping, overlapped
reduction) but skips its add. Every other case (no DDP, frozen weight, no grad mode, the switch off)
is megatron-core's forward unchanged.

How the rows are summed: training registers each micro-batch's device tokens with the loader's CPU
copy (``register_host_tokens``, from training/step.py). The lookup then finds the micro-batch's
distinct ids on the host (``torch.unique``: no device sync) and its backward is PyTorch's own
embedding backward into a compact ``[distinct ids, hidden]`` gradient (the dense path's kernel and
summation order, without the ``[vocab, hidden]`` fill) followed by one ``index_add_`` of those rows
into ``main_grad`` at distinct rows (no two writes to one row: deterministic). Tokens the host does
not know (a bare model's call, RL batches generated on the device) take megatron-core's dense path:
finding their distinct ids would make the host wait for the device, and summing on the device
(``accumulate_rows``, sort-based; ``_LookupIntoMainGrad`` without the compact rows) serializes the
tokens of one id: on an H200 2.03 ms a micro-batch vs the dense path's 1.39 with Zipf-distributed ids
(1.07 vs 1.51 with uniform ones), and multimodal rows repeat one ``<image>`` id in most positions.
"""
from __future__ import annotations

import collections
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from bluelm_kernels.transfer import tensor_key, to_device

# device tokens -> the loader's CPU copy of them, for the micro-batches about to run (a few in flight
# under pipeline schedules; the lookup reads its entry in the forward, the backward keeps what it needs)
_HOST_TOKENS: "collections.OrderedDict" = collections.OrderedDict()
_HOST_TOKENS_KEPT = 8


def register_host_tokens(tokens: torch.Tensor, host_tokens: torch.Tensor) -> None:
    """Make ``host_tokens`` (CPU) known as the values of the device ``tokens`` the embedding will look
    up, so its backward can sum the rows per distinct id without the device telling the host which
    ids there are. The entry keeps ``tokens`` alive (no other tensor can take its address meanwhile)."""
    if host_tokens.device.type != "cpu":  # ids already on the device: finding the distinct ones would sync
        return
    if tuple(host_tokens.shape) != tuple(tokens.shape):
        raise ValueError(f"host tokens {tuple(host_tokens.shape)} and device tokens {tuple(tokens.shape)} differ "
                         "in shape")
    _HOST_TOKENS[tensor_key(tokens)] = (tokens, host_tokens)
    while len(_HOST_TOKENS) > _HOST_TOKENS_KEPT:
        _HOST_TOKENS.popitem(last=False)


def _host_tokens(tokens: torch.Tensor) -> Optional[torch.Tensor]:
    hit = _HOST_TOKENS.get(tensor_key(tokens))
    return None if hit is None else hit[1]


def compact_rows(host_ids: torch.Tensor, vocab_start: int, vocab_end: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """On the host, for the flat ids of a micro-batch and this rank's vocabulary shard
    [``vocab_start``, ``vocab_end``): (``slot`` [n]: each token's row of a compact gradient,
    ``rows`` [k]: the shard's local row of each of the first k compact rows, ``width``: the compact
    gradient's row count). Ids outside the shard (whose output, hence gradient, is zero) share one
    extra compact row, past the k kept ones, that is dropped."""
    ids = host_ids.reshape(-1).to(torch.int64)
    outside = (ids < vocab_start) | (ids >= vocab_end)
    local = torch.where(outside, vocab_end - vocab_start, ids - vocab_start)  # outside: past every local row
    rows, slot = torch.unique(local, sorted=True, return_inverse=True)
    kept = int(rows.numel()) - int(bool(outside.any()))
    return slot, rows[:kept], int(rows.numel())


def _index_accumulate(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[index[i]] += src[i]`` with repeated indices added in the order of ``index``,
    deterministically: on CUDA ``index_put_(accumulate=True)`` (sort-based; ``index_add_`` there
    uses atomics), on the CPU ``index_add_`` (serial over the indices; ``index_put_`` with
    ``accumulate`` there adds with parallel atomics when several threads run)."""
    if dst.is_cuda:
        dst.index_put_((index,), src, accumulate=True)
    else:
        dst.index_add_(0, index, src)


def accumulate_rows(main_grad: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> None:
    """``main_grad[ids[i]] += grad[i]`` for a micro-batch's ``ids [n]`` and ``grad [n, h]``, in
    ``main_grad``'s dtype, in the order of the dense path: each row's contributions summed in token
    order from zero, then that sum added to ``main_grad`` once (so on the CPU in fp32 the result is
    bit-identical to ``main_grad += embedding_dense_backward(...)``). Deterministic, and no value is
    read on the host (no device sync inside the backward).

    The tokens are sorted by id (stable: token order within an id); every token's row goes to the
    position of the first token of its id (``head``), so ``sums`` holds each distinct id's total at
    one position and zeros elsewhere; ``sums`` is then added at the sorted ids, the zeros to their
    own rows, which leaves them unchanged."""
    rows = grad.to(main_grad.dtype)
    sorted_ids, order = torch.sort(ids, stable=True)
    n = sorted_ids.numel()
    positions = torch.arange(n, device=ids.device)
    starts = torch.ones(n, dtype=torch.bool, device=ids.device)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    head = torch.cummax(torch.where(starts, positions, 0), dim=0).values
    sums = torch.zeros_like(rows)
    _index_accumulate(sums, head, rows[order])
    _index_accumulate(main_grad, sorted_ids, sums)


def placeholder_grad(weight: torch.Tensor) -> torch.Tensor:
    """What megatron-core's fused linear returns as the weight gradient once the real one is in
    ``main_grad``: an uninitialized tensor of the weight's shape (zeros under ``zero_out_wgrad``,
    whose DDP hook adds it anyway). Autograd keeps it as ``.grad`` without a copy (a fresh tensor in
    the weight's layout) until DDP's hook drops it; an expanded scalar would be copied out densely."""
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(weight.shape, dtype=weight.dtype, device=weight.device)


class _LookupIntoMainGrad(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose weight gradient goes into ``weight.main_grad`` (fp32).
    ``slot`` / ``rows`` / ``width`` (``compact_rows``, on ``ids``' device) when the host knew the ids:
    the backward sums into a compact gradient and adds it at distinct rows; else ``accumulate_rows``."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, slot: Optional[torch.Tensor] = None,
                rows: Optional[torch.Tensor] = None, width: int = 0) -> torch.Tensor:
        ctx.save_for_backward(ids, weight, slot, rows)
        ctx.width = width
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        ids, weight, slot, rows = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        if slot is None:
            accumulate_rows(weight.main_grad, ids.reshape(-1), grad)
        else:
            sums = torch.ops.aten.embedding_dense_backward(grad, slot, ctx.width, -1, False)
            weight.main_grad.index_add_(0, rows, sums[: rows.numel()].to(weight.main_grad.dtype))
        if not hasattr(weight, "grad_added_to_main_grad"):  # megatron-core's rule: no DDP flag, no placeholder
            return None, None, None, None, None
        weight.grad_added_to_main_grad = True
        return None, placeholder_grad(weight), None, None, None


class MainGradVocabParallelEmbedding(VocabParallelEmbedding):
    """megatron-core's ``VocabParallelEmbedding`` (same parameter, state dict and sharded state dict)
    whose lookup, with ``gradient_accumulation_fusion`` on and a trained weight that has
    ``main_grad``, is ``_LookupIntoMainGrad``; the TP masking and the all-reduce / reduce-scatter
    around it are megatron-core's, so positions outside this rank's vocabulary shard still get a
    zero output and therefore a zero gradient (added to local row 0, as the dense path adds it)."""

    gradient_accumulation_fusion = False  # switched per module, after DDP wrapping (model_setup.py)

    def _into_main_grad(self) -> bool:
        w = self.weight
        return (self.gradient_accumulation_fusion and torch.is_grad_enabled() and w.requires_grad
                and hasattr(w, "main_grad"))

    def forward(self, input_):
        host = _host_tokens(input_) if self._into_main_grad() else None
        if host is None:  # also tokens the host does not know (generated on the device): the dense path
            return super().forward(input_)
        tp = self.tp_group.size() > 1
        if tp:
            input_mask = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            masked_input = input_.clone() - self.vocab_start_index
            masked_input[input_mask] = 0
        else:
            masked_input = input_
        slot, rows, width = compact_rows(host, self.vocab_start_index, self.vocab_end_index)
        output_parallel = _LookupIntoMainGrad.apply(masked_input, self.weight, to_device(slot, input_.device),
                                                    to_device(rows, input_.device), width)
        if tp:
            output_parallel[input_mask, :] = 0.0
        if self.reduce_scatter_embeddings:
            output_parallel = output_parallel.transpose(0, 1).contiguous()  # [b s h] -> [s b h]
            return reduce_scatter_to_sequence_parallel_region(output_parallel, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)


def use_main_grad_embedding(module: VocabParallelEmbedding) -> MainGradVocabParallelEmbedding:
    """Make a built ``VocabParallelEmbedding`` a ``MainGradVocabParallelEmbedding`` in place. GPTModel
    builds megatron-core's class by name; the subclass adds no state, so changing the instance's
    class keeps its parameter, initialization and RNG draws exactly as built."""
    if type(module) is not VocabParallelEmbedding:
        raise TypeError(f"use_main_grad_embedding: expected megatron-core's VocabParallelEmbedding, got "
                        f"{type(module).__name__}")
    module.__class__ = MainGradVocabParallelEmbedding
    return module
