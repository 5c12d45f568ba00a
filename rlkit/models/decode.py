"""The pixel path: transformer latents -> VAE -> images in [0, 1], memoised per batch.

Trainers build the ``decode`` of a :class:`~rewards.base.RewardInput` with :func:`make_decode` only when an
active reward reads pixels (``reward.space == "pixel"``); several pixel rewards then share one decode
through :class:`~rewards.base.MemoDecode`. The decode undoes ``z = (vae_latent - shift) * scale``
(``SD3Generator.decode``) and is differentiable when the latents require grad. Memory options for ReFL
through the VAE: gradient checkpointing of the decoder (recompute in backward), slicing (one image at a
time) and tiling (overlapping tiles, for large images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rewards.base import MemoDecode


@dataclass
class DecodeConfig:
    gradient_checkpointing: bool = False  # recompute the decoder's activations in backward
    slicing: bool = False  # decode a batch one image at a time
    tiling: bool = False  # decode large images in overlapping tiles (diffusers' VAE tiling)


def latents_to_vae(latents: Tensor, vae) -> Tensor:
    """Transformer latents -> the VAE's latent space: ``z / scale + shift``."""
    cfg = vae.config
    return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)


def configure_vae(vae, config: DecodeConfig) -> None:
    """Switch diffusers' slicing / tiling on or off to match ``config`` (both are VAE-wide settings)."""
    (vae.enable_slicing if config.slicing else vae.disable_slicing)()
    (vae.enable_tiling if config.tiling else vae.disable_tiling)()


def make_decode(generator, config: DecodeConfig | None = None, memo: bool = True) -> Callable[[Tensor], Tensor]:
    """A ``latents -> images in [0, 1]`` function for ``RewardInput.decode``.

    ``memo=True`` wraps it in a :class:`MemoDecode` (build a fresh one per batch; ``.calls`` counts decodes).
    """
    cfg = config or DecodeConfig()
    configure_vae(generator.vae, cfg)

    def decode(latents: Tensor) -> Tensor:
        if cfg.gradient_checkpointing and torch.is_grad_enabled() and latents.requires_grad:
            return checkpoint(generator.decode, latents, use_reentrant=False)
        return generator.decode(latents)

    return MemoDecode(decode) if memo else decode


def decode_if_needed(generator, rewards: Iterable, config: DecodeConfig | None = None) -> MemoDecode | None:
    """A fresh memoised decoder for one batch when any of ``rewards`` reads pixels, else None (no VAE work)."""
    if all(getattr(r, "space", "pixel") == "latent" for r in rewards):
        return None
    return make_decode(generator, config, memo=True)  # type: ignore[return-value]
