"""GRPO maths for Flow-GRPO: group advantages, the clipped ratio loss, the KL to the reference.

Pure functions of tensors. Shapes: ``N`` samples (images); ``group_ids`` (N,) integer labels of the prompt
each sample belongs to (a group may span processes: gather the rewards first, see
:func:`advantages_across_ranks`).
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping

import torch
from torch import Tensor

StdMode = Literal["group", "global"]
STD_MODES: tuple[str, ...] = ("group", "global")
DEFAULT_EPS = 1e-4  # added to the std (upstream Flow-GRPO)
DEFAULT_CLIP = 5.0  # |advantage| bound (upstream Flow-GRPO)
ZERO_ADVANTAGE_TOL = 0.0  # a group whose advantages are all within this of 0 carries no signal


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense indices 0..G-1 for arbitrary integer labels, and G."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    std: StdMode = "group",
    eps: float = DEFAULT_EPS,
    clip: float | None = DEFAULT_CLIP,
) -> Tensor:
    """``A = (r - mean_group(r)) / (s + eps)``, clamped to ``[-clip, clip]`` -> (N,) fp32.

    ``s`` is the group's std (``std="group"``) or the std of all N rewards (``"global"``, upstream's
    ``global_std``); both are population stds (``ddof = 0``, as ``numpy.std`` upstream). A group whose
    rewards are all equal gets advantages of exactly 0 (see :func:`informative_mask`). ``clip=None``
    disables the clamp.
    """
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be (N,), got {tuple(rewards.shape)} and "
                         f"{tuple(group_ids.shape)}")
    r = rewards.detach().float()
    idx, n_groups = _group_index(group_ids.to(r.device))
    counts = torch.zeros(n_groups, device=r.device).index_add_(0, idx, torch.ones_like(r))
    means = torch.zeros(n_groups, device=r.device).index_add_(0, idx, r) / counts
    centred = r - means[idx]
    if std == "group":
        var = torch.zeros(n_groups, device=r.device).index_add_(0, idx, centred**2) / counts
        scale = var.sqrt()[idx]
    else:
        scale = r.std(correction=0).expand_as(r)
    adv = centred / (scale + eps)
    # a group of equal rewards has no signal: exactly 0 (the mean's rounding would leave ~1e-4 residues)
    lo = torch.zeros(n_groups, device=r.device).scatter_reduce(0, idx, r, "amin", include_self=False)
    hi = torch.zeros(n_groups, device=r.device).scatter_reduce(0, idx, r, "amax", include_self=False)
    adv = torch.where((hi == lo)[idx], torch.zeros_like(adv), adv)
    return adv.clamp(-clip, clip) if clip is not None else adv


def informative_mask(advantages: Tensor, group_ids: Tensor, tol: float = ZERO_ADVANTAGE_TOL) -> Tensor:
    """(N,) bool: False for every sample of a group whose advantages are all zero (no learning signal)."""
    idx, n_groups = _group_index(group_ids.to(advantages.device))
    peak = torch.zeros(n_groups, device=advantages.device).scatter_reduce(
        0, idx, advantages.detach().abs().float(), "amax", include_self=False)
    return peak[idx] > tol


def mixed_advantages(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_ids: Tensor,
    std: StdMode = "group",
    eps: float = DEFAULT_EPS,
    clip: float | None = DEFAULT_CLIP,
) -> Tensor:
    """``clamp(sum_k w_k A_k)``: each reward normalised within groups on its own, weighted, and the sum clamped to
    ``[-clip, clip]``, as the DiNa-LRM release adds 0.2 x the PickScore advantage to its own and clamps the sum.

    Mixing advantages instead of raw scores makes rewards of different scales comparable.
    """
    if set(rewards) != set(weights):
        raise ValueError(f"rewards {sorted(rewards)} and weights {sorted(weights)} must name the same rewards")
    if not rewards:
        raise ValueError("mixed_advantages needs at least one reward")
    total = sum(weights[name] * group_advantages(r, group_ids, std=std, eps=eps, clip=None)
                for name, r in rewards.items())
    return total.clamp(-clip, clip) if clip is not None else total


def advantages_across_ranks(
    rewards: Tensor,
    group_ids: Tensor,
    gather: Callable[[Tensor], Tensor],
    rank: int,
    std: StdMode = "group",
    eps: float = DEFAULT_EPS,
    clip: float | None = DEFAULT_CLIP,
) -> Tensor:
    """Advantages of this process's samples when groups span processes.

    ``gather`` concatenates a tensor over processes in rank order (``accelerator.gather``); every process
    holds the same number of samples, and ``group_ids`` are global prompt labels. Returns (N_local,).
    """
    all_rewards, all_ids = gather(rewards.detach().float()), gather(group_ids)
    adv = group_advantages(all_rewards, all_ids, std=std, eps=eps, clip=clip)
    n = rewards.shape[0]
    return adv[rank * n:(rank + 1) * n]


def clipped_policy_loss(
    logp_new: Tensor, logp_old: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO clipped surrogate ``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))``, ``r = exp(logp_new - logp_old)``.

    Inputs are (B,) (one trained step) or any equal shapes. Stats (detached scalars): ``clip_fraction``
    (share of ratios outside the clip range), ``approx_kl`` = ``0.5 mean((logp_new - logp_old)^2)``,
    ``ratio_mean``.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    delta = logp_new - logp_old.detach()
    ratio = torch.exp(delta)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (delta**2).mean(),
            "ratio_mean": ratio.mean(),
        }
    return loss, stats


def kl_to_reference(mean_policy: Tensor, mean_ref: Tensor, std: Tensor | float) -> Tensor:
    """KL between two Gaussians of equal std per latent element, averaged over elements -> (B,).

    ``mean((mu - mu_ref)^2) / (2 std^2)``. Pass the *transition* std (``StepOutput.std``): this is then the
    true KL of the step's Gaussians. Upstream's flow-SDE divides by ``std_t^2`` instead (without the
    ``|dt|`` factor): pass ``StepOutput.std / sqrt(-dt)`` to reproduce it; for CPS both conventions agree.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean_policy.device)
    if (std <= 0).any():
        raise ValueError("kl_to_reference needs a positive std (a deterministic step has no KL)")
    elem = (mean_policy.float() - mean_ref.float()) ** 2 / (2 * std**2)
    return elem.mean(dim=tuple(range(1, elem.ndim)))


__all__ = [
    "DEFAULT_CLIP", "DEFAULT_EPS", "STD_MODES", "StdMode", "advantages_across_ranks", "clipped_policy_loss",
    "group_advantages", "informative_mask", "kl_to_reference", "mixed_advantages",
]
