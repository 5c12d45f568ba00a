"""``latent-direction``: a trivial, deterministic latent reward for trainer tests.

``score = <x0_estimate, d> / numel`` per item, with a fixed unit-variance direction ``d`` drawn once per
latent shape from ``seed``. For a noisy state ``x_sigma = (1 - sigma) x0 + sigma eps`` the estimate is
``x_sigma / (1 - sigma)``, whose expectation is ``x0``: the reward is noise-aware and unbiased.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rewards.base import Reward, RewardInput, RewardOutput

MAX_SIGMA = 0.999  # keeps 1 / (1 - sigma) finite at pure noise


class LatentDirectionReward(Reward):
    space = "latent"
    noise_aware = True
    differentiable = True

    def __init__(self, seed: int = 0, scale: float = 1.0):
        super().__init__()
        if scale == 0:
            raise ValueError("latent-direction option 'scale': must be non-zero")
        self.seed = int(seed)
        self.scale = float(scale)

    def direction(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
        """The fixed direction for one latent of ``shape`` (C, h, w): same seed and shape, same direction."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(shape, generator=g).to(device)

    def forward(self, batch: RewardInput) -> RewardOutput:
        if batch.latents is None:
            raise ValueError("latent-direction reads latents: RewardInput.latents is required")
        latents = batch.latents.float()
        sigmas = batch.clean_sigmas().float().clamp(max=MAX_SIGMA).reshape(-1, *([1] * (latents.dim() - 1)))
        d = self.direction(tuple(latents.shape[1:]), latents.device)
        per_item = (latents / (1 - sigmas) * d).flatten(1).sum(1) / d.numel()
        return RewardOutput(scores=self.scale * per_item, extras={"raw": per_item.detach()})
