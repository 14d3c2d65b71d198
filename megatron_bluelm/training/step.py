"""One optimizer step (and one evaluation pass) through megatron-core's pipeline schedules.

The loss is the token-level mean over the whole global batch: each micro-batch returns its loss *sum*
and token count, and the gradient finalization (``finalize_grads``: megatron-core's
``finalize_model_grads``, then the division) divides the gradients by the global token count
(all-reduced over data parallel). This makes the step independent of how the batch is split
into micro-batches and data-parallel ranks, which the layout tests rely on.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.utils import get_pp_last_rank

from bluelm_kernels.transfer import to_device  # the loader pins its batches on CUDA already (data/loader.py)
from megatron_bluelm.models.embedding import register_host_tokens

# document_ids [b, s]: which packed document each position belongs to (None: one causal sequence).
_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask", "document_ids")
_OPTIONAL_INPUTS = ("pixel_values",)  # passed to the model only when the batch has them (multimodal)
_ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids")  # [b, s] per position
# None: fold where the document attention has a kernel whose cost is Σ len² (CUDA: varlen flash or a
# block-sparse FlexAttention mask); CPU attends through a dense [b·s, b·s] mask, which folding would
# make b times larger. True / False: always / never (tests; benchmarks measuring what folding saves).
ROW_FOLDING: Optional[bool] = None


def fold_rows(batch: dict) -> dict:
    """A micro-batch of ``b`` packed rows [b, s] as one row [1, b * s] (host tensors, before the copy to
    the device). The model computes the same thing: every position's loss, RoPE and embedding are its
    own, and attention never crosses a row end (as unfolded) because the ids of row ``r`` are offset
    past those of rows ``< r``. What it saves: megatron-core's activations are
    [s, b, h]; with b > 1 the document attention's token stream ([b * s] in row order) and the splice of
    image embeddings are transposed copies in both directions at every layer; with b == 1 they are
    views. Tiles (``pixel_values``) are already in row order, the order of the folded ``<image>`` slots.
    The dense ``attention_mask``, if the batch has one besides its ids, is dropped: the ids supersede it
    (``model_attention_mask``)."""
    ids = batch.get("document_ids")
    if ids is None:
        raise ValueError("fold_rows: the micro-batch has no document_ids (rows without documents attend across "
                         "their whole row and cannot be folded into one)")
    if ids.dim() != 2:
        raise ValueError(f"fold_rows: document_ids must be [batch, sequence], got {tuple(ids.shape)}")
    b, s = ids.shape
    out = dict(batch)
    if b == 1:
        return out
    width = ids.amax(dim=1).to(torch.int64) + 1
    offset = torch.cumsum(width, 0) - width
    out["document_ids"] = ids.to(torch.int64) + offset[:, None]
    for key in _ROW_KEYS:
        t = out.get(key)
        if t is None:
            continue
        if tuple(t.shape[:2]) != (b, s):
            raise ValueError(f"fold_rows: {key} {tuple(t.shape)} does not match document_ids {(b, s)}")
        out[key] = t.reshape(1, b * s, *t.shape[2:])
    out["attention_mask"] = None
    return out


def _language_model(chunk):
    """The decoder (BlueLMModel) of a model chunk, inside its DDP / Float16Module wrappers and, for the
    multimodal model, its ``language_model``."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return getattr(chunk, "language_model", chunk)


def _rope_per_token(model) -> bool:
    """Whether the decoder takes its rotary positions from ``position_ids`` (models/decoder.py): only
    then does a folded row keep every position's angle (else row r's would shift by r * s)."""
    flags = [bool(getattr(_language_model(chunk), "per_token_rope", False)) for chunk in model]
    return bool(flags) and all(flags)


def _on_cuda(model) -> bool:
    return any(p.is_cuda for chunk in model for p in itertools.islice(chunk.parameters(), 1))


def plan_row_folding(model, iterators: List[Iterator], micro_batch_size: int) -> tuple[List[Iterator], bool]:
    """Whether this step runs each micro-batch's rows folded into one (``fold_rows``): when every
    micro-batch holds more than one row of packed documents and the model's RoPE is per position
    (and, unless ``ROW_FOLDING`` says otherwise, the model is on CUDA).
    Decided from the first micro-batch of each iterator (put back in front of it), and agreed over the
    pipeline group, whose stages must exchange activations of one shape ([b * s, 1, h] folded,
    [s, b, h] not)."""
    enabled = ROW_FOLDING if ROW_FOLDING is not None else _on_cuda(model)
    if not enabled or micro_batch_size <= 1 or not _rope_per_token(model):  # the same on every rank
        return iterators, False
    fold = all(it is not None for it in iterators)
    if fold:
        firsts = [next(it) for it in iterators]
        fold = all(first.get("document_ids") is not None for first in firsts)
        iterators = [itertools.chain([first], it) for first, it in zip(firsts, iterators)]
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized() \
            and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
            else torch.device("cpu")
        flag = torch.tensor([int(fold)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        fold = bool(flag.item())
    return iterators, fold


def batch_to_device(batch: dict, device: torch.device) -> dict:
    keys = _BATCH_KEYS + tuple(k for k in _OPTIONAL_INPUTS if k in batch)
    return {k: (to_device(batch[k], device) if batch.get(k) is not None else None) for k in keys}


def model_attention_mask(batch: dict, host_batch: Optional[dict] = None):
    """The model's ``attention_mask`` argument: packed rows carry their document ids (compact, the
    attention derives what it needs once per micro-batch, models/attention.py, from ``host_batch``'s
    CPU ids when given: no device sync); else the batch's own mask (None: causal)."""
    ids = batch.get("document_ids")
    if ids is None:
        return batch.get("attention_mask")
    from megatron_bluelm.models.attention import document_attention_mask

    return document_attention_mask(ids, None if host_batch is None else host_batch.get("document_ids"))


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Per-token losses [b, s] (or their masked sum, from the fused loss) -> (loss sum, token count,
    report) as megatron-core expects."""
    mask = loss_mask.float()
    loss = output.float() if output.dim() == 0 else torch.sum(output.float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.float()])
    return loss, num_tokens, {"lm loss": report}


# True: the fused loss runs only on the positions with a loss (``loss_rows``); False: on every position,
# as the torch backend does (benchmarks measuring what the selection saves).
LOSS_ROWS = True


def _takes_loss_rows(chunk) -> bool:
    """Whether this model chunk computes the fused loss (models/decoder.py: the last pipeline stage of
    the fused backend), the only place that uses ``loss_rows``."""
    lm = _language_model(chunk)
    return bool(getattr(lm, "fused_loss", False) and getattr(lm, "post_process", False))


def loss_rows(loss_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The flat indices, in the order of ``loss_mask.reshape(-1)`` (labels' order, which the fused loss
    flattens its rows into), of the positions with ``loss_mask > 0``; None unless the mask is on the
    host (a device ``nonzero`` would make the host wait for the device)."""
    if loss_mask is None or loss_mask.device.type != "cpu":
        return None
    return torch.nonzero(loss_mask.reshape(-1) > 0).view(-1)


def make_forward_step(device: torch.device, fold: bool = False):
    """megatron-core's forward step; ``fold``: each micro-batch's rows run as one (``fold_rows``)."""
    def forward_step(data_iterator: Iterator, model):
        host = next(data_iterator)
        if fold:
            host = fold_rows(host)
        batch = batch_to_device(host, device)
        # the embedding's backward sums its rows per distinct id, known from the host tokens (models/embedding.py)
        register_host_tokens(batch["tokens"], host["tokens"])
        extra = {k: batch[k] for k in _OPTIONAL_INPUTS if k in batch}
        if "pixel_values" in extra:  # the splice finds its <image> slots in the CPU tokens: no device sync
            extra["host_input_ids"] = host["tokens"]
        rows = loss_rows(host.get("loss_mask")) if LOSS_ROWS and _takes_loss_rows(model) else None
        if rows is not None:  # from the (folded) host mask: the order of the labels the model gets
            extra["loss_rows"] = to_device(rows, device)
        mask = model_attention_mask(batch, host)
        output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"],
                       loss_mask=batch["loss_mask"], **extra)
        return output, partial(loss_func, batch["loss_mask"])

    return forward_step


@dataclass
class StepResult:
    loss: Optional[float]  # mean token loss of the global batch (None off the last stage)
    tokens: int  # loss tokens in the global batch
    grad_norm: Optional[float] = None
    skipped: bool = False
    metrics: dict = field(default_factory=dict)  # a stage's own per-step values, logged with the step (RL)


def configure_model_hooks(model: List[torch.nn.Module], optimizer) -> None:
    """Wire megatron-core's schedule hooks: loss scaling, DDP no-sync, grad finalization."""
    config = model[0].config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_grads
    if model[0].ddp_config.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if len(model) > 1:
            config.grad_sync_func = [m.start_grad_sync for m in model]
    if model[0].ddp_config.overlap_param_gather:
        config.param_sync_func = [m.start_param_sync for m in model]
        if len(model) == 1:
            config.param_sync_func = config.param_sync_func[0]


def finalize_grads(model: List[torch.nn.Module], num_tokens: Optional[torch.Tensor] = None,
                   pg_collection=None, force_all_reduce: bool = False) -> None:
    """megatron-core's ``finalize_model_grads`` (gradient all-reduces over DP, SP norms, embeddings),
    with the per-token normalisation done here: the same values (grad *= 1 / global tokens, the count
    broadcast from the last pipeline stage and all-reduced over data parallel as there), but without
    reading the count on the host and in one vectorized pass. megatron-core tests ``num_tokens > 0``
    in Python (the host waits there for the whole backward) and multiplies each fp32 gradient buffer by
    a 0-dim device tensor, which PyTorch runs as a broadcast kernel (11.6 GB of fp32 gradients of the
    multimodal model on an H200: 7.8 ms against 6.7 ms, ``tools/bench/grad_passes_bench.py``). Here
    ``_foreach_mul_`` takes the scale from device memory, and a count of 0 (no loss token: the gradients
    are zero) scales by 1."""
    finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    if num_tokens is None:
        return
    if pg_collection is not None:
        pp_group, dp_cp_group = pg_collection.pp, pg_collection.dp_cp
    else:
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dist.broadcast(num_tokens, src=get_pp_last_rank(pp_group), group=pp_group)
    dist.all_reduce(num_tokens, group=dp_cp_group)
    scaling = torch.where(num_tokens > 0, 1.0 / num_tokens, torch.ones_like(num_tokens, dtype=torch.float))
    for chunk in model:
        buffers = getattr(chunk, "buffers", None)  # DDP's list of grad buffers (a plain Module's is a method)
        if not isinstance(buffers, (list, tuple)):  # not megatron-core's DDP: the wrapper's own scaling
            chunk.scale_gradients(scaling)
            continue
        grads = [b.grad_data for b in list(buffers) + list(getattr(chunk, "expert_parallel_buffers", []))]
        if grads:
            torch._foreach_mul_(grads, scaling)


def _reduce_loss(losses_reduced: list) -> tuple[Optional[float], int]:
    """Sum the micro-batch reports, then over data parallel; the last pipeline stage has them."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None, 0
    total = torch.zeros(2, dtype=torch.float64)
    for report in losses_reduced:
        total += report["lm loss"].detach().double().cpu()
    device = losses_reduced[0]["lm loss"].device if losses_reduced else torch.device("cpu")
    total = total.to(device)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    loss_sum, tokens = total.tolist()
    return loss_sum / max(tokens, 1.0), int(tokens)


def _data_arg(iterators: List[Iterator]):
    return iterators if len(iterators) > 1 else iterators[0]


def _run_schedule(model, iterators: List[Iterator], forward_only: bool, **shape) -> list:
    """All micro-batches of one step through megatron-core's schedule for this layout; micro-batches of
    packed rows run folded into one row each (``plan_row_folding``)."""
    iterators, fold = plan_row_folding(model, list(iterators), shape["micro_batch_size"])
    if fold:
        shape["seq_length"] *= shape["micro_batch_size"]
        shape["micro_batch_size"] = 1
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(shape.pop("device"), fold), data_iterator=_data_arg(iterators),
        model=model, forward_only=forward_only, **shape)


def train_step(model, optimizer, scheduler, iterators: List[Iterator], *, num_microbatches: int,
               seq_length: int, micro_batch_size: int, device: torch.device) -> StepResult:
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = _run_schedule(model, iterators, False, num_microbatches=num_microbatches, seq_length=seq_length,
                           micro_batch_size=micro_batch_size, device=device)
    # Read the loss before the update, not after: the schedule's gradient finalization has already waited
    # for the backward (megatron-core reads the token count on the host), so this read waits for little,
    # and after the update's kernels are queued nothing makes the host wait for them: the next step's
    # first micro-batch is queued while the device still runs the optimizer.
    loss, tokens = _reduce_loss(losses)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return StepResult(loss=loss, tokens=tokens, grad_norm=grad_norm, skipped=not ok)


@torch.no_grad()
def eval_step(model, iterators: List[Iterator], *, num_microbatches: int, seq_length: int,
              micro_batch_size: int, device: torch.device) -> StepResult:
    for chunk in model:
        chunk.eval()
    try:
        losses = _run_schedule(model, iterators, True, num_microbatches=num_microbatches, seq_length=seq_length,
                               micro_batch_size=micro_batch_size, device=device)
    finally:
        for chunk in model:
            chunk.train()
    loss, tokens = _reduce_loss(losses)
    return StepResult(loss=loss, tokens=tokens)
