"""Exponential moving average of the trainable weights, for evaluation and export.

``shadow = decay * shadow + (1 - decay) * param`` every ``update_every``-th call of :meth:`EMA.update`.
The shadow copy is float32 whatever the parameters' dtype, and it averages float32 values: under DeepSpeed with
bf16 or fp16 the optimiser's fp32 master weights (:func:`rlkit.runtime.accelerator.full_precision`), not the
module's rounded copies, which would hold the average up to half a bf16 step behind. Under DeepSpeed ZeRO-3 the
parameters are gathered for each update and for :meth:`EMA.applied` (every rank keeps the whole shadow of the
trainable weights: cheap for LoRA, large for full fine-tuning), which writes through DeepSpeed's
``GatheredParameters(modifier_rank=0)``, the supported way to change partitioned weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rlkit.runtime.accelerator import full_precision, gathered

MODIFIER_RANK = 0  # under ZeRO-3, the rank whose swapped values are re-partitioned (all ranks hold the same)


def _local(param: nn.Parameter) -> torch.Tensor:
    """What this rank holds of ``param``: its ZeRO-3 partition, else the parameter."""
    return getattr(param, "ds_tensor", param)


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
        with torch.no_grad(), gathered(self.params):
            self.shadow = [value.clone() for value in full_precision(self.params)]

    @torch.no_grad()
    def update(self) -> bool:
        """Call after each optimiser step; averages every ``update_every``-th call. Returns whether it did.

        Under ZeRO-3 every rank must call it (it gathers the parameters).
        """
        self.calls += 1
        if self.calls % self.update_every:
            return False
        with gathered(self.params):
            for shadow, value in zip(self.shadow, full_precision(self.params)):
                shadow.lerp_(value, 1.0 - self.decay)
        self.num_updates += 1
        return True

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Runs the body with the EMA weights in place (in the parameters' dtype); the live weights come back
        afterwards, exactly, and the float32 average is left as it was. Every rank must enter it."""
        with torch.no_grad():  # under ZeRO-3 each rank keeps its own partition, not a second whole copy
            live = [_local(param).detach().clone() for param in self.params]
            with gathered(self.params, modifier_rank=MODIFIER_RANK):
                for shadow, param in zip(self.shadow, self.params):
                    param.data.copy_(shadow.to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for value, param in zip(live, self.params):
                    _local(param).data.copy_(value)

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
