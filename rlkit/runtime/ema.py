"""Exponential moving average of the trainable weights, for evaluation and export.

``shadow = decay * shadow + (1 - decay) * param`` every ``update_every``-th call of :meth:`EMA.update`.
The shadow copy is float32 whatever the parameters' dtype. Under DeepSpeed ZeRO-3 each rank averages its own
partition (``param.ds_tensor``), so the EMA is sharded like the weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _storage(param: nn.Parameter) -> torch.Tensor:
    """The tensor holding this rank's values of ``param`` (its ZeRO-3 partition when partitioned)."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class EMA:
    def __init__(self, parameters: Iterable[nn.Parameter], decay: float, update_every: int = 1):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must lie in [0, 1], got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA: update_every must be >= 1, got {update_every}")
        self.params = list(parameters)
        if not self.params:
            raise ValueError("EMA: no parameters to average")
        self.decay = decay
        self.update_every = update_every
        self.calls = 0  # update() calls
        self.num_updates = 0  # averaging steps actually taken
        self.shadow = [_storage(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> bool:
        """Call after each optimiser step; averages every ``update_every``-th call. Returns whether it did."""
        self.calls += 1
        if self.calls % self.update_every:
            return False
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(_storage(param).float(), 1.0 - self.decay)
        self.num_updates += 1
        return True

    @torch.no_grad()
    def swap(self) -> None:
        """Exchanges the live weights and the EMA weights (call again to undo)."""
        for shadow, param in zip(self.shadow, self.params):
            live = _storage(param)
            current = live.detach().float().clone()
            live.copy_(shadow.to(live.dtype))
            shadow.copy_(current)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Runs the body with the EMA weights in place; the trained weights come back afterwards."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "update_every": self.update_every, "calls": self.calls,
                "num_updates": self.num_updates, "shadow": [s.detach().cpu().clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError(f"EMA.load_state_dict: {len(shadow)} tensors saved, {len(self.shadow)} parameters now")
        for i, (saved, mine) in enumerate(zip(shadow, self.shadow)):
            if saved.shape != mine.shape:
                raise ValueError(f"EMA.load_state_dict: tensor {i} has shape {tuple(saved.shape)}, "
                                 f"expected {tuple(mine.shape)}")
            mine.copy_(saved)
        self.calls = int(state["calls"])
        self.num_updates = int(state["num_updates"])
