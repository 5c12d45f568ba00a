"""The pixel path: transformer latents -> VAE -> images in [0, 1], memoised per batch.

Trainers build the ``decode`` of a :class:`~rewards.base.RewardInput` with :func:`make_decode` only when an
active reward reads pixels (``reward.space == "pixel"``); several pixel rewards then share one decode
through :class:`~rewards.base.MemoDecode`. The decode undoes ``z = (vae_latent - shift) * scale``
(``SD3Generator.decode``) and is differentiable when the latents require grad. Memory options for ReFL
through the VAE, set by a recipe's ``model.decode`` (:class:`~rlkit.config.DecodeConfig`): gradient checkpointing
of the decoder (recompute in backward), slicing (one image at a time) and tiling (overlapping tiles, for large
images).
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import Tensor

from rewards.base import MemoDecode
from rlkit.config import DecodeConfig


def latents_to_vae(latents: Tensor, vae) -> Tensor:
    """Transformer latents -> the VAE's latent space: ``z / scale + shift``."""
    cfg = vae.config
    return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)


def make_decode(generator, config: DecodeConfig | None = None, memo: bool = True) -> Callable[[Tensor], Tensor]:
    """A ``latents -> images in [0, 1]`` function for ``RewardInput.decode``: the generator's decode, configured
    by ``config`` when given (``SD3Generator.configure_decode``; else as the recipe's ``model.decode`` set it).

    ``memo=True`` wraps it in a :class:`MemoDecode` (build a fresh one per batch; ``.calls`` counts decodes).
    """
    if config is not None:
        generator.configure_decode(config)
    return MemoDecode(generator.decode) if memo else generator.decode


def decode_if_needed(generator, rewards: Iterable, config: DecodeConfig | None = None) -> MemoDecode | None:
    """A fresh memoised decoder for one batch when any of ``rewards`` reads pixels, else None (no VAE work)."""
    if all(getattr(r, "space", "pixel") == "latent" for r in rewards):
        return None
    return make_decode(generator, config, memo=True)  # type: ignore[return-value]
