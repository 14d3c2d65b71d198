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


def test_log_ratio_and_k3_are_clamped():
    """A policy 50 nats away from old / reference: ratio and KL stay finite and bounded."""
    s = GRPOSettings(kl_coef=1.0, log_ratio_clamp=20.0, kl_clamp=10.0)
    logp = torch.tensor([[0.0, -60.0]])
    far = torch.tensor([[-50.0, 0.0]])
    out = grpo_token_loss(logp, far, torch.ones(1, 1), far, s)
    assert out["ratio"][0, 0] == pytest.approx(math.exp(20.0), rel=1e-5)
    assert out["kl"].max() <= 10.0 and torch.isfinite(out["loss"]).all()
    logp.requires_grad_(True)
    grpo_token_loss(logp, far, torch.ones(1, 1), far, s)["loss"].sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_dual_clip_bounds_negative_advantage_loss():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[10.0, 2.0, 10.0]]))
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    plain = grpo_token_loss(logp, old, adv, None, GRPOSettings(clip_low=0.2, clip_high=0.2))
    dual = grpo_token_loss(logp, old, adv, None, GRPOSettings(clip_low=0.2, clip_high=0.2, dual_clip=3.0))
    assert plain["pg"][0, 0] == pytest.approx(10.0)  # -A * ratio, unbounded without dual-clip
    torch.testing.assert_close(dual["pg"], torch.tensor([[3.0, 2.0, -1.2]]))  # -A * 3; ratio 2 < 3 kept
    assert dual["dual_clipped"].tolist() == [[1.0, 0.0, 0.0]]


def test_loss_aggregation_modes():
    from megatron_bluelm.rl.loss import aggregate

    loss = torch.tensor([[1.0, 1.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])

    def mean(mode, **kw):
        total, count = aggregate(loss, mask, GRPOSettings(loss_agg=mode, **kw))
        return (total / count).item()

    assert mean("token-mean") == pytest.approx(7 / 4)
    assert mean("seq-mean-token-sum") == pytest.approx((3 + 4) / 2)
    assert mean("seq-mean-token-mean") == pytest.approx((1 + 4) / 2)
    assert mean("seq-mean-token-sum-norm", norm_length=8) == pytest.approx((3 / 8 + 4 / 8) / 2)
    with pytest.raises(ValueError, match="loss_agg"):
        GRPOSettings(loss_agg="token-sum")


def test_rollout_importance_weights():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    roll = torch.log(torch.tensor([[0.5, 0.1, 0.4]]))  # rho = 1, 5, 1.25
    adv = torch.ones(1, 1)
    tis = grpo_token_loss(old, old, adv, None, GRPOSettings(rollout_is="tis", rollout_is_cap=2.0), roll)
    torch.testing.assert_close(tis["is_weight"], torch.tensor([[1.0, 2.0, 1.25]]))
    torch.testing.assert_close(tis["loss"], -tis["is_weight"])  # ratio 1: the weighted -A
    mis = grpo_token_loss(old, old, adv, None, GRPOSettings(rollout_is="mis", rollout_is_cap=2.0), roll)
    assert mis["is_keep"].tolist() == [[1.0, 0.0, 1.0]] and mis["is_weight"].tolist() == [[1.0, 1.0, 1.0]]
    off = grpo_token_loss(old, old, adv, None, GRPOSettings(rollout_is="none"), roll)
    assert off["is_weight"].tolist() == [[1.0, 1.0, 1.0]]


def test_source_std_advantages():
    from megatron_bluelm.rl.advantages import source_std_advantages

    rewards = torch.tensor([1.0, 0.0, 10.0, 0.0])
    adv, keep = source_std_advantages(rewards, 2, torch.tensor([0, 0, 1, 1]), torch.tensor([0.5, 5.0]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert keep.all()
