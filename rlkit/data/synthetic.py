"""A synthetic latent preference set with a learnable signal, for CPU tests and the tiny recipe.

``synthetic:pairs=512,seed=0`` as a data source gives pairs whose latents are i.i.d. N(0, 1) except that the
chosen latent carries ``signal * pattern``, with one fixed +-1 ``pattern`` (drawn from ``pattern_seed``, shared
by the train and held-out sets). A reward model that learns the pattern separates the pairs; under shared
noise ``x_u = (1 - u) x0 + u eps`` the signal shrinks with ``1 - u``, so accuracy falls as ``u`` approaches 1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rlkit.data.pairs import PreferencePair

SYNTHETIC_PREFIX = "synthetic:"
PROMPTS = ("a red circle", "a blue square", "a green triangle", "two yellow stars")


@dataclass
class SyntheticPreferenceConfig:
    pairs: int = 256
    channels: int = 4
    size: int = 8  # latent height and width
    signal: float = 0.5  # amplitude of the pattern the chosen latent carries
    seed: int = 0  # the latents
    pattern_seed: int = 1234  # the pattern (keep equal across train and held-out sets)

    def __post_init__(self) -> None:
        for name in ("pairs", "channels", "size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SyntheticPreferenceConfig.{name}: must be > 0, got {getattr(self, name)}")

    @classmethod
    def parse(cls, source: str) -> "SyntheticPreferenceConfig":
        """``synthetic:key=value,...`` -> config; unknown keys are errors naming the key."""
        body = source[len(SYNTHETIC_PREFIX):]
        types = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, float | int] = {}
        for item in filter(None, (s.strip() for s in body.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in types:
                raise ValueError(f"{source!r}: expected key=value with keys {sorted(types)}, got {item!r}")
            kind = float if types[key] in (float, "float") else int
            try:
                kwargs[key] = kind(value)
            except ValueError:
                raise ValueError(f"{source!r}: {key} must be {'a number' if kind is float else 'an integer'}, "
                                 f"got {value!r}") from None
        return cls(**kwargs)

    def pattern(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.pattern_seed)
        shape = (self.channels, self.size, self.size)
        return torch.randint(0, 2, shape, generator=g).float() * 2 - 1


def synthetic_pairs(config: SyntheticPreferenceConfig, source: str = "synthetic") -> list[PreferencePair]:
    g = torch.Generator().manual_seed(config.seed)
    shape = (config.pairs, config.channels, config.size, config.size)
    chosen = torch.randn(shape, generator=g) + config.signal * config.pattern()
    rejected = torch.randn(shape, generator=g)
    return [PreferencePair(PROMPTS[i % len(PROMPTS)], chosen[i], rejected[i], "latent", 1.0, source, i,
                           ("chosen", "rejected")) for i in range(config.pairs)]
