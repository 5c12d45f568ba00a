"""A reward whose ``nan_at``-th training call (0-based, counted per process) scores NaN: an update to skip."""

from __future__ import annotations

import torch

from rewards.base import RewardOutput
from rewards.toy import LatentDirectionReward


class NaNAt(LatentDirectionReward):
    def __init__(self, seed: int = 0, scale: float = 1.0, nan_at: int = -1):
        super().__init__(seed=seed, scale=scale)
        self.nan_at, self.train_calls = int(nan_at), 0

    def forward(self, batch):
        out = super().forward(batch)
        if not torch.is_grad_enabled():  # evaluation
            return out
        self.train_calls += 1
        if self.train_calls - 1 == self.nan_at:
            return RewardOutput(scores=out.scores * float("nan"), extras=out.extras)
        return out
