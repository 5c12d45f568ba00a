"""GRPO maths against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.grpo import (
    advantages_across_ranks,
    clipped_policy_loss,
    group_advantages,
    informative_mask,
    kl_to_reference,
    mixed_advantages,
)


def test_group_advantages_hand_values():
    # group 0: [1, 3] -> mean 2, std 1 -> [-1, 1] / (1 + eps); group 1: [0, 0, 6] -> mean 2, std sqrt(8)
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 6.0])
    ids = torch.tensor([7, 7, 2, 2, 2])
    adv = group_advantages(rewards, ids, std="group", eps=1e-4, clip=None)
    s1 = math.sqrt(8.0)
    expected = torch.tensor([-1 / (1 + 1e-4), 1 / (1 + 1e-4), -2 / (s1 + 1e-4), -2 / (s1 + 1e-4), 4 / (s1 + 1e-4)])
    torch.testing.assert_close(adv, expected)


def test_global_std_uses_all_rewards():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 6.0])
    ids = torch.tensor([0, 0, 1, 1, 1])
    adv = group_advantages(rewards, ids, std="global", eps=0.0, clip=None)
    s = torch.tensor([1.0, 3.0, 0.0, 0.0, 6.0]).numpy().std()  # population std, as numpy
    expected = torch.tensor([-1.0, 1.0, -2.0, -2.0, 4.0]) / float(s)
    torch.testing.assert_close(adv, expected)


def test_clip_bounds_advantages():
    rewards = torch.tensor([0.0] * 99 + [1.0])
    ids = torch.zeros(100, dtype=torch.long)
    adv = group_advantages(rewards, ids, clip=5.0)
    assert adv.max().item() == 5.0  # unclipped: 0.99 / 0.0995 = 9.95
    assert group_advantages(rewards, ids, clip=None).max().item() == pytest.approx(0.99 / (0.0995 + 1e-4), rel=1e-4)


def test_zero_std_group_is_exactly_zero_and_masked():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.5, 0.3])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, ids)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert torch.equal(informative_mask(adv, ids), torch.tensor([False, False, False, True, True, True]))


def test_mixed_advantages_weighted_sum_of_normalised():
    ids = torch.tensor([0, 0, 1, 1])
    a = torch.tensor([1.0, 3.0, 5.0, 5.0])
    b = torch.tensor([100.0, 0.0, 10.0, 30.0])  # a different scale: normalisation makes it comparable
    mixed = mixed_advantages({"a": a, "b": b}, {"a": 1.0, "b": 0.2}, ids, eps=0.0)
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0]) + 0.2 * torch.tensor([1.0, -1.0, -1.0, 1.0])
    torch.testing.assert_close(mixed, expected)
    with pytest.raises(ValueError, match="same rewards"):
        mixed_advantages({"a": a}, {"b": 1.0}, ids)


def test_mixed_advantages_clamp_the_sum_not_each_term():
    """The release clamps A + 0.2 A_proxy at adv_clip: an outlier's own advantage may exceed the clip where the
    other reward pulls the sum back inside it, and a sum beyond it is cut there."""
    ids = torch.zeros(10, dtype=torch.long)
    outlier = torch.tensor([10.0] + [0.0] * 9)  # group advantage 3.0 at eps 0 (population std)
    against = -outlier
    unclipped = group_advantages(outlier, ids, eps=0.0, clip=None)
    assert unclipped[0] == pytest.approx(3.0)
    mixed = mixed_advantages({"a": outlier, "b": against}, {"a": 1.0, "b": 0.5}, ids, eps=0.0, clip=2.0)
    assert mixed[0] == pytest.approx(1.5)  # 3.0 - 0.5 x 3.0 inside the clip (clipping each first would give 1.0)
    mixed = mixed_advantages({"a": outlier, "b": outlier}, {"a": 1.0, "b": 0.5}, ids, eps=0.0, clip=2.0)
    assert mixed[0] == pytest.approx(2.0) and mixed.abs().max() <= 2.0  # 4.5 clamped


def test_group_spanning_ranks_equals_single_process():
    """Two ranks each hold half of every group; gathered advantages equal the single-process ones."""
    g = torch.Generator().manual_seed(0)
    world, per_rank, k = 2, 6, 4  # 3 prompts x 4 images, spread over 2 ranks (a repeat sampler's layout)
    ids_all = torch.arange(3).repeat_interleave(k)[torch.randperm(12, generator=g)]
    rewards_all = torch.randn(12, generator=g)
    single = group_advantages(rewards_all, ids_all, std="group")
    shards = [(rewards_all[r * per_rank:(r + 1) * per_rank], ids_all[r * per_rank:(r + 1) * per_rank])
              for r in range(world)]

    def gather(t: torch.Tensor) -> torch.Tensor:  # what accelerator.gather returns: rank-order concatenation
        return torch.cat([ids if t.dtype == torch.long else r for r, ids in shards])

    for rank, (r_local, id_local) in enumerate(shards):
        local = advantages_across_ranks(r_local, id_local, gather, rank=rank)
        torch.testing.assert_close(local, single[rank * per_rank:(rank + 1) * per_rank])
    # a group split across ranks but normalised on one rank only would differ
    wrong = group_advantages(shards[0][0], shards[0][1])
    assert not torch.allclose(wrong, single[:per_rank])


def test_on_policy_ratio_is_one_and_clipped_equals_unclipped():
    logp = torch.randn(8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    adv = torch.randn(8, generator=torch.Generator().manual_seed(2))
    loss, stats = clipped_policy_loss(logp, logp.detach(), adv, clip_range=1e-4)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    torch.testing.assert_close(loss, (-adv).mean())
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 8)  # d/dlogp of -A exp(logp - logp_old) at ratio 1


def test_clipped_loss_hand_values():
    logp_old = torch.zeros(4)
    logp_new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = clipped_policy_loss(logp_new, logp_old, adv, clip_range=0.2)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2 (clipped, no grad); A>0, r=0.5: max(-0.5, -0.8) = -0.5
    # A<0, r=1.5: max(1.5, 1.2) = 1.5; A<0, r=0.5: max(0.5, 0.8) = 0.8 (clipped, no grad)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert stats["clip_fraction"].item() == 1.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    loss.backward()
    torch.testing.assert_close(logp_new.grad, torch.tensor([0.0, -0.5 / 4, 1.5 / 4, 0.0]))


def test_kl_zero_when_policy_equals_reference_and_hand_value():
    mu = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    std = torch.full((3, 1, 1, 1), 0.3)
    assert torch.equal(kl_to_reference(mu, mu.clone(), std), torch.zeros(3))
    shifted = mu + torch.tensor([0.0, 0.3, 0.6]).view(3, 1, 1, 1)
    torch.testing.assert_close(kl_to_reference(shifted, mu, std), torch.tensor([0.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match="positive std"):
        kl_to_reference(mu, mu, 0.0)


def test_kl_matches_torch_distributions():
    from torch.distributions import Normal, kl_divergence

    g = torch.Generator().manual_seed(4)
    mu, mu_ref = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    std = torch.tensor([0.2, 0.7]).view(2, 1, 1, 1)
    ref = kl_divergence(Normal(mu, std), Normal(mu_ref, std)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl_to_reference(mu, mu_ref, std), ref)


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="std must be"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), std="batch")
    with pytest.raises(ValueError, match="clip_range"):
        clipped_policy_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.0)


def test_the_logged_clip_fraction_is_of_the_advantage_that_is_clamped():
    """With mixed advantages the clamp acts on the weighted sum: an outlier pulled back inside by the other reward
    is not clipped, and is not counted as clipped."""
    from rlkit.config import FlowGRPOConfig
    from rlkit.trainers.flow_grpo import MIXED_REWARD, compute_advantages

    ids = torch.zeros(10, dtype=torch.long)
    outlier = torch.tensor([10.0] + [0.0] * 9)  # its own group advantage is 3.0
    cfg = FlowGRPOConfig(adv_clip=2.0, std="group")
    adv, stats = compute_advantages({MIXED_REWARD: outlier, "a": outlier, "b": -outlier}, ids, cfg,
                                    {"a": 1.0, "b": 0.5})
    assert adv.abs().max() == pytest.approx(1.5, abs=1e-3) and stats["adv_clip_fraction"] == 0.0
    adv, stats = compute_advantages({MIXED_REWARD: outlier}, ids, cfg, None)
    assert adv.abs().max() == 2.0 and stats["adv_clip_fraction"] == pytest.approx(0.1)
