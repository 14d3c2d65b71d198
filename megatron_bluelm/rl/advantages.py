"""Group-relative advantages (GRPO): each prompt's G samples are scored against each other.

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)          (normalize_std=True, GRPO)
    A_i =  r_i - mean(r_group)                                  (normalize_std=False, Dr. GRPO)

std is the population standard deviation of the group. A group whose rewards are all equal carries
no learning signal (every advantage is 0); ``keep`` marks the groups with non-zero variance so the
trainer can drop the others from the loss and report how many were filtered.
"""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [n_groups * G] (group-major) -> (advantages [n*G], keep [n*G] bool)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    r = rewards.double().view(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    adv = torch.where(std > 0, centered / (std + eps), 0.0) if normalize_std else centered
    keep = (std > 0).expand_as(r)
    return adv.float().reshape(-1), keep.reshape(-1)


def source_std_advantages(rewards: torch.Tensor, group_size: int, source_ids: torch.Tensor,
                          source_std: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred per group, scaled by the standard deviation of the sample's *source* over the whole
    step (``source_std[source_ids]``, computed over every data-parallel rank by the caller): sources
    with a wide reward range (a model score) and narrow ones (0/1 verifiers) get comparable scales
    without inflating near-constant groups. ``keep`` as in ``group_advantages``."""
    centered, keep = group_advantages(rewards, group_size, normalize_std=False)
    scale = source_std.double()[source_ids] + eps
    return (centered.double() / scale).float(), keep


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n_groups] bool: True where every sample of the group got the same reward."""
    r = rewards.double().view(-1, group_size)
    return r.std(dim=1, unbiased=False) == 0
