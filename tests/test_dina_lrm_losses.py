"""DiNa-LRM preference losses against hand-computed values (math.erf, no torch.special)."""

from __future__ import annotations

import math

import pytest
import torch

from rewards.dina_lrm.losses import (
    bradley_terry_loss,
    preference_loss,
    thurstone_calibrated_loss,
    thurstone_fixed_loss,
    thurstone_variance,
)


def phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


S_POS, S_NEG = 1.3, 0.4


@pytest.mark.parametrize("sigma", [0.0, 0.4, 1.0])
def test_calibrated_thurstone_fidelity_and_nll(sigma):
    var = 2.0 * sigma**2 + 0.05  # k = 2, c = 0.05 per item
    p = phi((S_POS - S_NEG) / math.sqrt(2 * var))
    pos, neg = torch.tensor([S_POS]), torch.tensor([S_NEG])
    assert thurstone_variance(sigma).item() == pytest.approx(var)
    got = thurstone_calibrated_loss(pos, neg, torch.tensor([sigma]))
    assert got.item() == pytest.approx(1 - math.sqrt(p), rel=1e-5)
    got = thurstone_calibrated_loss(pos, neg, sigma, form="nll")
    assert got.item() == pytest.approx(-math.log(p), rel=1e-5)
    y = 0.7  # soft label
    got = thurstone_calibrated_loss(pos, neg, sigma, label=y)
    # near its minimum the loss is a difference of O(1) terms: float32 leaves about 1e-7 of it
    assert got.item() == pytest.approx(1 - math.sqrt(y * p) - math.sqrt((1 - y) * (1 - p)), rel=1e-5, abs=1e-7)
    got = thurstone_calibrated_loss(pos, neg, sigma, label=torch.tensor([y]), form="nll")
    assert got.item() == pytest.approx(-(y * math.log(p) + (1 - y) * math.log(1 - p)), rel=1e-5)


def test_more_noise_means_softer_comparisons():
    pos, neg = torch.tensor([1.0]), torch.tensor([0.0])
    losses = [thurstone_calibrated_loss(pos, neg, s).item() for s in (0.0, 0.4, 1.0)]
    assert losses[0] < losses[1] < losses[2]


def test_fixed_variance_bt_and_margin():
    pos, neg = torch.tensor([S_POS, -0.2]), torch.tensor([S_NEG, 0.5])
    p = [phi((a - b) / math.sqrt(2 * 0.5)) for a, b in zip([S_POS, -0.2], [S_NEG, 0.5])]
    want = sum(1 - math.sqrt(x) for x in p) / 2
    assert thurstone_fixed_loss(pos, neg).item() == pytest.approx(want, rel=1e-5)

    def softplus(x: float) -> float:
        return math.log1p(math.exp(x))

    want_bt = (softplus(-(S_POS - S_NEG)) + softplus(-(-0.7))) / 2
    assert bradley_terry_loss(pos, neg).item() == pytest.approx(want_bt, rel=1e-5)
    want_margin = (softplus(-(S_POS - S_NEG - 1)) + softplus(-(-0.7 - 1))) / 2
    assert preference_loss("bt_margin", pos, neg).item() == pytest.approx(want_margin, rel=1e-5)
    per_pair = preference_loss("bt", pos, neg, reduction="none")
    assert per_pair.shape == (2,)


@pytest.mark.parametrize("name", ["thurstone_calibrated", "nll_calibrated", "thurstone_fixed", "bt", "bt_margin"])
def test_large_gaps_are_finite_with_finite_gradients(name):
    gaps = torch.tensor([-1e4, -300.0, -40.0, 0.0, 40.0, 300.0, 1e4])
    pos = gaps.clone().requires_grad_(True)
    neg = torch.zeros_like(gaps)
    loss = preference_loss(name, pos, neg, sigma=torch.full_like(gaps, 0.4), reduction="none")
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(pos.grad).all()
    assert (pos.grad <= 0).all()  # raising the chosen score never increases the loss
    if name in ("thurstone_calibrated", "thurstone_fixed"):
        assert loss[0].item() == pytest.approx(1.0) and loss[-1].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("y", [0.5, 0.7, 0.9])
def test_a_soft_label_is_best_matched_by_that_probability(y):
    """The fidelity loss is a proper scoring rule: least where P(chosen preferred) equals the label (a tie at
    equal scores), with a gradient towards it from either side."""
    gaps = torch.linspace(-3, 3, 6001)
    loss = thurstone_calibrated_loss(gaps, torch.zeros_like(gaps), 0.4, label=torch.full_like(gaps, y),
                                     reduction="none")
    best = gaps[loss.argmin()].item()
    assert phi(best / math.sqrt(2 * (2 * 0.4**2 + 0.05))) == pytest.approx(y, abs=1e-3)
    for start in (best - 1.0, best + 1.0):
        gap = torch.tensor([start], requires_grad=True)
        thurstone_calibrated_loss(gap, torch.zeros(1), 0.4, label=torch.tensor([y])).backward()
        assert gap.grad.item() * (start - best) > 0  # descending moves the gap towards the best one


def test_soft_label_limits_are_finite():
    pos = torch.tensor([50.0, -50.0], requires_grad=True)
    neg = torch.zeros(2)
    loss = thurstone_calibrated_loss(pos, neg, 0.0, label=torch.tensor([0.0, 1.0]), reduction="none")
    assert torch.allclose(loss, torch.ones(2))
    loss.sum().backward()
    assert torch.isfinite(pos.grad).all()


def test_calibrated_loss_needs_sigma():
    with pytest.raises(ValueError, match="sigma"):
        preference_loss("thurstone_calibrated", torch.zeros(1), torch.zeros(1))
