"""Preference losses of DiNa-LRM, as pure functions of the two scores (and the pair's noise level).

Noise-calibrated Thurstone: each score is a Gaussian with variance ``var(sigma) = k sigma^2 + c``, so
``P(x+ > x-) = Phi((s+ - s-) / sqrt(2 var(sigma)))``. The release uses k = 2.0, c = 0.05 and trains with the
fidelity loss ``1 - sqrt(p)``; the ablations use a fixed per-item variance 0.5, Bradley-Terry, BT with margin 1.

Everything is computed from ``log Phi`` (``torch.special.log_ndtr``), so huge score gaps give exact 0 or 1
losses and finite gradients instead of ``sqrt(0)`` / ``log(0)`` NaNs. All functions return per-pair values
(shape of the broadcast inputs) unless ``reduction="mean"``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

CALIBRATED_K = 2.0  # variance slope in sigma^2 (release)
CALIBRATED_C = 0.05  # per-item variance of a clean comparison (release)
FIXED_VARIANCE = 0.5  # per-item variance of the "thurstone-constant" ablation
BT_MARGIN = 1.0

Reduction = Literal["none", "mean"]
LossName = Literal["thurstone_calibrated", "thurstone_fixed", "bt", "bt_margin", "nll_calibrated"]


def _reduce(x: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")


def thurstone_variance(sigma: Tensor | float, k: float = CALIBRATED_K, c: float = CALIBRATED_C) -> Tensor:
    """Per-item score variance at noise level ``sigma``: ``k sigma^2 + c``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return k * sigma.square() + c


def thurstone_z(s_pos: Tensor, s_neg: Tensor, variance: Tensor | float) -> Tensor:
    """The standardised gap ``(s+ - s-) / sqrt(2 var)``."""
    variance = torch.as_tensor(variance, dtype=s_pos.dtype, device=s_pos.device)
    return (s_pos - s_neg) / torch.sqrt(2 * variance)


def log_pair_probability(s_pos: Tensor, s_neg: Tensor, variance: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(log p, log (1 - p))`` with ``p = Phi(z)``, both stable for any gap."""
    z = thurstone_z(s_pos.float(), s_neg.float(), variance)
    return torch.special.log_ndtr(z), torch.special.log_ndtr(-z)


def fidelity_loss(log_p: Tensor, log_q: Tensor, label: Tensor | float = 1.0) -> Tensor:
    """The fidelity loss ``1 - sqrt(y p) - sqrt((1 - y)(1 - p))`` from ``log p``, ``log (1 - p)``.

    A hard label y = 1 gives the release's ``1 - sqrt(p)``. For soft labels and ties this is the fidelity of
    Tsai et al. (FRank), least at p = y. The form ``1 - sqrt(y p + (1 - y)(1 - p))`` is linear in p under the
    root: it is least at p = 1 for every y > 1/2 and constant (no gradient) for a tie.
    """
    y = torch.as_tensor(label, dtype=log_p.dtype, device=log_p.device)
    if y.dim() == 0 and float(y) == 1.0:
        return -torch.expm1(0.5 * log_p)
    y, log_p, log_q = torch.broadcast_tensors(y, log_p, log_q)
    agree = torch.where(y > 0, torch.exp(0.5 * (torch.log(y.clamp(min=1e-30)) + log_p)), torch.zeros_like(log_p))
    other = torch.where(y < 1, torch.exp(0.5 * (torch.log1p(-y.clamp(max=1 - 1e-7)) + log_q)), torch.zeros_like(log_q))
    return 1 - agree - other


def nll_loss(log_p: Tensor, log_q: Tensor, label: Tensor | float = 1.0) -> Tensor:
    """``-(y log p + (1 - y) log (1 - p))``."""
    y = torch.as_tensor(label, dtype=log_p.dtype, device=log_p.device)
    if y.dim() == 0 and float(y) == 1.0:
        return -log_p
    return -(y * log_p + (1 - y) * log_q)


def thurstone_calibrated_loss(
    s_pos: Tensor, s_neg: Tensor, sigma: Tensor | float, k: float = CALIBRATED_K, c: float = CALIBRATED_C,
    label: Tensor | float = 1.0, form: Literal["fidelity", "nll"] = "fidelity", reduction: Reduction = "mean",
) -> Tensor:
    """Noise-calibrated Thurstone loss; ``sigma`` is the pair's shared noise level (B,) or a float."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=s_pos.device)
    log_p, log_q = log_pair_probability(s_pos, s_neg, thurstone_variance(sigma, k, c))
    loss = fidelity_loss(log_p, log_q, label) if form == "fidelity" else nll_loss(log_p, log_q, label)
    return _reduce(loss, reduction)


def thurstone_fixed_loss(s_pos: Tensor, s_neg: Tensor, variance: float = FIXED_VARIANCE,
                         label: Tensor | float = 1.0, form: Literal["fidelity", "nll"] = "fidelity",
                         reduction: Reduction = "mean") -> Tensor:
    """Thurstone with one per-item variance at every noise level (the release's ``thurstone-constant``)."""
    log_p, log_q = log_pair_probability(s_pos, s_neg, variance)
    loss = fidelity_loss(log_p, log_q, label) if form == "fidelity" else nll_loss(log_p, log_q, label)
    return _reduce(loss, reduction)


def bradley_terry_loss(s_pos: Tensor, s_neg: Tensor, margin: float = 0.0, reduction: Reduction = "mean") -> Tensor:
    """``-log sigmoid(s+ - s- - margin)`` (margin 0: Bradley-Terry; the release's ``bt-margin`` uses 1)."""
    return _reduce(-F.logsigmoid(s_pos.float() - s_neg.float() - margin), reduction)


def preference_loss(name: LossName, s_pos: Tensor, s_neg: Tensor, sigma: Tensor | float | None = None,
                    reduction: Reduction = "mean") -> Tensor:
    """The loss a reward-model recipe names (``RewardModelConfig.loss``) with the release's constants."""
    if name in ("thurstone_calibrated", "nll_calibrated"):
        if sigma is None:
            raise ValueError(f"loss {name!r} needs the pair's noise level sigma")
        form = "fidelity" if name == "thurstone_calibrated" else "nll"
        return thurstone_calibrated_loss(s_pos, s_neg, sigma, form=form, reduction=reduction)
    if name == "thurstone_fixed":
        return thurstone_fixed_loss(s_pos, s_neg, reduction=reduction)
    if name == "bt":
        return bradley_terry_loss(s_pos, s_neg, reduction=reduction)
    if name == "bt_margin":
        return bradley_terry_loss(s_pos, s_neg, margin=BT_MARGIN, reduction=reduction)
    raise ValueError(f"unknown preference loss {name!r}; expected one of {LossName.__args__}")
