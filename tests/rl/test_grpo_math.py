"""Advantages on hand-made groups and the GRPO token loss (ratio, clipping, KL)."""
import math

import pytest
import torch

from megatron_bluelm.rl.advantages import group_advantages
from megatron_bluelm.rl.loss import GRPOSettings, grpo_token_loss


def test_group_advantages_exact():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0])
    adv, keep = group_advantages(rewards, group_size=4, eps=0.0)
    # group 1: mean 0.5, population std 0.5; group 2: mean 2, std sqrt(0.5); group 3: no variance
    s2 = math.sqrt(0.5)
    expected = [1, -1, -1, 1, 1 / s2, -1 / s2, 0, 0, 0, 0, 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32))
    assert keep.tolist() == [True] * 8 + [False] * 4


def test_dr_grpo_only_centres():
    adv, _ = group_advantages(torch.tensor([3.0, 1.0]), group_size=2, normalize_std=False)
    assert adv.tolist() == [1.0, -1.0]


def test_groups_must_be_complete():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)


def test_first_update_ratio_one_and_zero_kl():
    logp = torch.randn(3, 5)
    adv = torch.tensor([1.0, -2.0, 0.5])[:, None]
    out = grpo_token_loss(logp, logp.clone(), adv, logp.clone(), GRPOSettings(kl_coef=0.1))
    assert torch.equal(out["ratio"], torch.ones(3, 5))
    assert torch.equal(out["kl"], torch.zeros(3, 5))
    torch.testing.assert_close(out["loss"], -adv.expand(3, 5))  # -A per token
    assert out["clipped"].sum() == 0


def test_clipping_asymmetric():
    s = GRPOSettings(clip_low=0.2, clip_high=0.28)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5, 0.9]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    out = grpo_token_loss(logp, old, adv, None, s)
    # A>0: ratio 1.5 clipped to 1.28, 1.1 kept; A<0: ratio 0.5 clipped to 0.8, 0.9 kept
    torch.testing.assert_close(out["pg"], torch.tensor([[-1.28, -1.1, 0.8, 0.9]]))
    assert out["clipped"].tolist() == [[1.0, 0.0, 1.0, 0.0]]
    # gradients flow only through unclipped tokens
    logp.requires_grad_(True)
    grpo_token_loss(logp, old, adv, None, s)["loss"].sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0 and logp.grad[0, 1] != 0 and logp.grad[0, 3] != 0


def test_k3_kl_is_positive_and_matches_formula():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    out = grpo_token_loss(logp, logp, torch.zeros(1, 1), ref, GRPOSettings(kl_coef=1.0))
    d = ref - logp
    torch.testing.assert_close(out["kl"], torch.exp(d) - d - 1)
    assert (out["kl"] > 0).all()
