"""One GRPO step on the megatron model: log-probs (current and reference), then the policy update,
all through megatron-core's pipeline schedules, so every TP x PP x DP layout trains the same way.

The model's loss output with ``labels`` is the per-token cross-entropy, i.e. -log p(label); the
update's loss function turns it into the GRPO token loss (rl/loss.py). Old log-probs are recomputed
with the policy right before the first update of a batch (same code path), so the first update's
ratio is exactly 1.
"""
from __future__ import annotations

from functools import partial
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_bluelm.rl.loss import GRPOSettings, grpo_token_loss
from megatron_bluelm.training.step import batch_to_device

_STATS = ("loss", "tokens", "ratio", "kl", "clipped", "nll")


def micro_batches(rows: dict, extra: dict, mbs: int) -> list[dict]:
    n = rows["tokens"].shape[0]
    out = []
    for i in range(0, n, mbs):
        mb = {k: (v[i:i + mbs] if v is not None else None) for k, v in rows.items()}
        mb.update({k: (v[i:i + mbs] if v is not None else None) for k, v in extra.items()})
        out.append(mb)
    return out


def _model_forward(device, data_iterator: Iterator, model):
    mb = next(data_iterator)
    b = batch_to_device(mb, device)
    output = model(b["tokens"], b["position_ids"], None, labels=b["labels"])  # -log p(label), [b, s]
    return output, mb


@torch.no_grad()
def sequence_logprobs(model: List[torch.nn.Module], batches: list[dict], seq_length: int, mbs: int,
                      device) -> Optional[list[torch.Tensor]]:
    """log p(label) [b, s] per micro-batch, on the last pipeline stage (None elsewhere)."""

    def forward_step(it, m):
        output, _ = _model_forward(device, it, m)
        return output, lambda out, non_loss_data=False: (-out.float()).detach().cpu()

    outs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=model,
        num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=mbs,
        forward_only=True, collect_non_loss_data=True)
    return outs if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None


def _grpo_loss(settings: GRPOSettings, mb: dict, output: torch.Tensor):
    logp = -output.float()
    dev = logp.device
    adv = mb["advantages"].to(dev)[:, None]
    ref = mb["ref_logp"].to(dev) if mb.get("ref_logp") is not None else None
    terms = grpo_token_loss(logp, mb["old_logp"].to(dev), adv, ref, settings)
    mask = mb["loss_mask"].to(dev) * mb["keep"].to(dev)[:, None]
    loss = (terms["loss"] * mask).sum()
    report = torch.stack([loss.detach(), mask.sum(), (terms["ratio"] * mask).sum().detach(),
                          (terms["kl"] * mask).sum().detach(), (terms["clipped"] * mask).sum(),
                          (-logp * mask).sum().detach()])
    return loss, mask.sum().to(torch.int), {"rl": report}


def policy_update(model, optimizer, scheduler, batches: list[dict], settings: GRPOSettings, *,
                  seq_length: int, mbs: int, device) -> dict:
    """One optimizer step over ``batches`` (this DP rank's micro-batches)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()

    def forward_step(it, m):
        output, mb = _model_forward(device, it, m)
        return output, partial(_grpo_loss, settings, mb)

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=model,
        num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=mbs, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return {"grad_norm": None if grad_norm is None else float(grad_norm), "skipped": not ok,
            **reduce_stats(reports)}


def reduce_stats(reports: list) -> dict:
    """Token-weighted means over the global batch (last stage sums, then all-reduce over DP)."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return {}
    total = torch.zeros(len(_STATS), dtype=torch.float64)
    for r in reports:
        total += r["rl"].detach().double().cpu()
    device = reports[0]["rl"].device if reports else torch.device("cpu")
    total = total.to(device)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    n = max(total[1].item(), 1.0)
    return {"loss": total[0].item() / n, "update_tokens": int(total[1].item()), "ratio_mean": total[2].item() / n,
            "kl": total[3].item() / n, "clip_frac": total[4].item() / n, "entropy_est": total[5].item() / n}
