"""Cost measurement shared by ``rlkit sweep`` and ``rlkit bench``: FLOPs of a callable (torch's
``FlopCounterMode``: matmuls, convolutions and attention from their shapes; one multiply-add = 2 FLOPs),
and the peak resident memory of a block of code in this process.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

RSS_POLL_S = 0.02  # sampling period of the peak-RSS watcher
_STATM = "/proc/self/statm"


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Runs ``fn()`` under ``FlopCounterMode``; returns (its result, total FLOPs).

    On meta tensors attention is counted (it runs as two batched matmuls); CPU's fused SDPA kernel counts 0.
    """
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; elsewhere the lifetime peak)."""
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_rss_bytes()


def max_rss_bytes() -> int:
    """Lifetime peak RSS of this process (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakRSS:
    """``with PeakRSS() as m: ...`` -> ``m.peak_bytes``: the highest RSS seen while the block ran.

    A background thread samples ``/proc/self/statm``; unlike ``ru_maxrss`` (monotonic over the process's
    life) this isolates one block, e.g. one run of a sweep executed in-process after another.
    """

    def __init__(self, poll_s: float = RSS_POLL_S):
        self.poll_s = poll_s
        self.peak_bytes = 0
        self.start_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            time.sleep(self.poll_s)

    def __enter__(self) -> "PeakRSS":
        self.start_bytes = self.peak_bytes = current_rss_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())


class _AttentionScope(torch.overrides.TorchFunctionMode):
    """Marks the calls of ``F.scaled_dot_product_attention`` (however a model imported it) with their (Lq, Lk)."""

    def __init__(self, owner: "SavedActivations"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k = args[0], args[1]
        for t in args[:3]:  # a fused kernel keeps q, k and v for its backward, as the math kernel here may not
            self.owner._keep(t)
            self.owner._pinned.append(t)
        self.owner._attention = (q.shape[-2], k.shape[-2])
        try:
            out = func(*args, **kwargs)
        finally:
            self.owner._attention = None
        # a fused kernel keeps its output and one log-sum-exp per query row (fp32)
        self.owner._extra += out.numel() * out.element_size() + q.numel() // q.shape[-1] * 4
        return out


class SavedActivations:
    """``with SavedActivations(exclude=params) as s: out = f(x)`` -> ``s.bytes``: the most that autograd kept for
    backward passes at any one time inside the block (each tensor's storage counted once, views by their base;
    parameters and ``exclude`` (weights, buffers) are not activations). A tensor counts from when it is saved until
    it is freed, and the meter holds no reference to it: over several forward and backward passes (a training
    epoch) it gives the peak, not the sum, and does not itself keep memory alive. Works on meta tensors, so it sizes
    full models without allocating them. ``attention="flash"`` sizes attention as a fused kernel keeps it (inputs,
    output, log-sum-exp; counted until the block ends) instead of what the math kernel that meta tensors run keeps
    (the Lq x Lk probabilities as well)."""

    def __init__(self, exclude=(), attention: str = "math"):
        if attention not in ("math", "flash"):
            raise ValueError(f"attention must be 'math' or 'flash', got {attention!r}")
        self._excluded = {id(t) for t in exclude}
        self._live: dict[int, int] = {}  # id of a saved storage's tensor -> its bytes, while that tensor lives
        self._now = self._peak = 0
        self._pinned: list[torch.Tensor] = []  # what a fused attention kernel would keep, held until the block ends
        self._flash = attention == "flash"
        self._attention: tuple[int, int] | None = None
        self._extra = 0
        self._ctx = None
        self._mode = None

    def _keep(self, t: torch.Tensor) -> None:
        base = t._base if t._base is not None else t
        weight = isinstance(base, torch.nn.Parameter) or id(base) in self._excluded or id(t) in self._excluded
        if weight or id(base) in self._live:
            return
        size = base.numel() * base.element_size()
        self._live[id(base)] = size
        self._now += size
        self._peak = max(self._peak, self._now)
        weakref.finalize(base, self._release, id(base))

    def _release(self, key: int) -> None:
        self._now -= self._live.pop(key, 0)

    def _pack(self, t: torch.Tensor):
        if self._attention is None:  # inside attention: the math kernel's internals, sized by _AttentionScope
            self._keep(t)
        return t

    @property
    def bytes(self) -> int:
        return self._peak + self._extra

    def __enter__(self) -> "SavedActivations":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        if self._flash:
            self._mode = _AttentionScope(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
        self._ctx.__exit__(*exc)
        self._pinned.clear()


@dataclass
class PassCost:
    """One differentiable call: forward FLOPs, backward FLOPs (gradients w.r.t. ``inputs`` only, as through a
    frozen reward or a LoRA-tuned generator's input path) and the activation bytes kept for that backward."""

    forward_flops: int
    backward_flops: int
    activation_bytes: int


def first_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output (a tensor, a tuple, or a transformers ``ModelOutput``)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "pooler_output") and out.pooler_output is not None:
        return out.pooler_output
    if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        return out.last_hidden_state
    if hasattr(out, "sample"):
        return out.sample
    return first_tensor(out[0])


def pass_cost(fn: Callable[[], Any], inputs: list[torch.Tensor], modules: tuple = (),
              attention: str = "flash") -> PassCost:
    """Forward + input-gradient backward of ``fn`` counted with ``FlopCounterMode``; activations sized on the
    way (weights of ``modules`` excluded; attention as :class:`SavedActivations` ``attention`` says)."""
    weights = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
    with SavedActivations(exclude=weights, attention=attention) as saved:
        out, fwd = count_flops(lambda: first_tensor(fn()))
    _, bwd = count_flops(lambda: torch.autograd.grad(out.float().sum(), inputs, allow_unused=True))
    return PassCost(fwd, bwd, saved.bytes)
