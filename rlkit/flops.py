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
from typing import Any, Callable

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
