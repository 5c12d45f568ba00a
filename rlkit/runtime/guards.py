"""Guards around the training loop: stop cleanly on SIGTERM, skip steps whose loss or reward is not finite.

``TrainingGuard`` sets a flag when SIGTERM arrives (preemption, ``scancel``); the trainer checks it between
steps, writes a checkpoint and exits. ``check`` skips a step whose values are NaN/inf and raises
:class:`NonFiniteError` after ``max_consecutive_nonfinite`` such steps in a row. Under a process group both
decisions are agreed by all ranks (an all-reduce), so no rank skips or stops alone and leaves the others
waiting in a collective.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONSECUTIVE_NONFINITE = 5
DEFAULT_SIGNALS = (signal.SIGTERM,)

Checked = torch.Tensor | float | Mapping[str, torch.Tensor | float]


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or reward."""


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_flag(flag: bool, op_name: str) -> bool:
    """``flag`` combined over all ranks with MIN (all true) or MAX (any true)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=getattr(dist.ReduceOp, op_name))
    return bool(value.item())


def _nonfinite_names(values: Checked) -> list[str]:
    items = values.items() if isinstance(values, Mapping) else [("loss", values)]
    bad = []
    for name, value in items:
        tensor = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


class TrainingGuard:
    """SIGTERM flag and non-finite step skipping. ``close()`` restores the previous signal handlers."""

    def __init__(self, max_consecutive_nonfinite: int = DEFAULT_MAX_CONSECUTIVE_NONFINITE,
                 signals: tuple[int, ...] = DEFAULT_SIGNALS, install: bool = True):
        if max_consecutive_nonfinite < 1:
            raise ValueError(f"TrainingGuard: max_consecutive_nonfinite must be >= 1, got {max_consecutive_nonfinite}")
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.consecutive_nonfinite = 0
        self.skipped_total = 0
        self._stop = False
        self._previous: dict[int, Any] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        logger.warning("received signal %s: will checkpoint and stop after the current step", signum)
        self._stop = True

    def request_stop(self) -> None:
        self._stop = True

    @property
    def stop_requested(self) -> bool:
        """This process received a stop signal (local; see :meth:`should_stop` under several processes)."""
        return self._stop

    def should_stop(self) -> bool:
        """Whether any rank received a stop signal. Every rank must call it at the same point of the loop."""
        return _all_reduce_flag(self._stop, "MAX") if _distributed() else self._stop

    def check(self, values: Checked, step: int) -> bool:
        """True when every value is finite (on every rank); False means: skip this step (it is logged).

        ``values``: a loss tensor, or a mapping such as ``{"loss": loss, "reward": rewards}``. Raises
        :class:`NonFiniteError` after ``max_consecutive_nonfinite`` skipped steps in a row.
        """
        bad = _nonfinite_names(values)
        finite = not bad
        if _distributed():
            finite = _all_reduce_flag(finite, "MIN")
        if finite:
            self.consecutive_nonfinite = 0
            return True
        self.consecutive_nonfinite += 1
        self.skipped_total += 1
        logger.warning("step %d: non-finite %s; skipping the step (%d in a row, %d in total)", step,
                       ", ".join(bad) or "value on another rank", self.consecutive_nonfinite, self.skipped_total)
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"stopping at step {step}: {self.consecutive_nonfinite} consecutive steps had a non-finite "
                f"{', '.join(bad) or 'value (on another rank)'} (limit max_consecutive_nonfinite="
                f"{self.max_consecutive_nonfinite}). Lower the learning rate, check the reward's scale and "
                "normalisation, or use fp32/bf16 instead of fp16; resume from the last checkpoint.")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive_nonfinite": self.consecutive_nonfinite, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self.skipped_total = int(state["skipped_total"])

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "TrainingGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
