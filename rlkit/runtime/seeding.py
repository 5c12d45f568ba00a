"""Explicit seeds and generators.

Every random draw in a trainer takes a ``torch.Generator`` whose seed is derived from the recipe seed and
named keys (purpose, step, rank), so a draw does not depend on how many other draws happened before it and
a resumed run draws exactly what an uninterrupted run would.
"""

from __future__ import annotations

import base64
import hashlib
import random

import numpy as np
import torch

SEED_BITS = 63


def derive_seed(base: int, *keys: int | str) -> int:
    """A 63-bit seed from ``base`` and ``keys``, stable across processes, platforms and Python runs."""
    digest = hashlib.sha256("/".join(str(part) for part in (base, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << SEED_BITS) - 1)


def make_generator(base: int, *keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator seeded with ``derive_seed(base, *keys)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(base, *keys))


class Generators:
    """One generator per purpose (``gens["noise"]``), seeded ``derive_seed(seed, purpose, rank)``.

    Created lazily on first use; ``state_dict()`` / ``load_state_dict()`` carry their states through a
    checkpoint (JSON-serialisable).
    """

    def __init__(self, seed: int, rank: int = 0, device: torch.device | str = "cpu"):
        self.seed = seed
        self.rank = rank
        self.device = torch.device(device)
        self._gens: dict[str, torch.Generator] = {}

    def __getitem__(self, purpose: str) -> torch.Generator:
        if purpose not in self._gens:
            self._gens[purpose] = make_generator(self.seed, purpose, self.rank, device=self.device)
        return self._gens[purpose]

    def state_dict(self) -> dict[str, str]:
        return {name: base64.b64encode(g.get_state().numpy().tobytes()).decode() for name, g in self._gens.items()}

    def load_state_dict(self, state: dict[str, str]) -> None:
        for name, encoded in state.items():
            raw = np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).copy()
            self[name].set_state(torch.from_numpy(raw))


def seed_everything(seed: int, rank: int = 0, device: torch.device | str = "cpu") -> Generators:
    """Seeds the global RNGs (python, numpy, torch: weight init, dropout) per rank and returns per-purpose generators.

    The global seeds differ per rank (``derive_seed(seed, "global", rank)``); anything that must agree across
    ranks (prompts, initial noise of a global batch) should use ``make_generator(seed, ...)`` without the rank.
    """
    global_seed = derive_seed(seed, "global", rank)
    random.seed(global_seed)
    np.random.seed(global_seed % 2**32)
    torch.manual_seed(global_seed)
    return Generators(seed, rank, device)
