"""Differentiable image preprocessing shared by the pixel rewards.

Every function takes images as ``(B, 3, H, W)`` float tensors in [0, 1] and keeps the autograd graph, so a
ReFL loss reaches the latents through ``decode -> preprocess -> reward``. Each one mirrors a step of a
transformers image processor (``CLIPImageProcessor``, ``Qwen2VLImageProcessor``); the tests compare them
with those processors. Resizing uses ``F.interpolate(mode="bicubic", antialias=True)``, whose kernel is
PIL's antialiased bicubic (a = -0.5), the filter the processors apply to PIL images.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from rewards.base import RewardInput

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "center_crop",
    "clip_preprocess",
    "normalize",
    "qwen2vl_patchify",
    "qwen2vl_preprocess",
    "resize_bicubic",
    "reward_pixels",
    "shortest_edge_size",
    "smart_resize",
]


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")


def resize_bicubic(images: Tensor, size: tuple[int, int], clamp: bool = True) -> Tensor:
    """Antialiased bicubic resize to ``size = (height, width)``; a no-op when the size already matches.

    ``clamp`` keeps the bicubic overshoot inside [0, 1], as PIL does when it resizes 8-bit images.
    """
    _check_images(images)
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0) if clamp else out


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """Output size of a ``{"shortest_edge": n}`` resize, with transformers' rounding (the long side truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Centre crop to ``size = (height, width)``; the offset rounds down, as in transformers."""
    _check_images(images)
    height, width = images.shape[-2:]
    crop_h, crop_w = size
    if crop_h > height or crop_w > width:
        raise ValueError(f"cannot crop {height}x{width} images to {crop_h}x{crop_w}")
    top = (height - crop_h) // 2
    left = (width - crop_w) // 2
    return images[..., top : top + crop_h, left : left + crop_w]


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def clip_preprocess(
    images: Tensor,
    shortest_edge: int = 224,
    crop_size: tuple[int, int] = (224, 224),
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> Tensor:
    """``CLIPImageProcessor`` as tensor ops: shortest side to ``shortest_edge``, centre crop, normalise."""
    _check_images(images)
    size = shortest_edge_size(images.shape[-2], images.shape[-1], shortest_edge)
    return normalize(center_crop(resize_bicubic(images.float(), size), crop_size), mean, std)


def qwen2vl_patchify(images: Tensor, patch_size: int, temporal_patch_size: int, merge_size: int) -> Tensor:
    """Normalised ``(B, C, H, W)`` images -> ``(B * gh * gw, C * T * P * P)`` rows in Qwen2-VL's token order.

    Rows run over merge blocks (``gh / m``, ``gw / m``) and then inside each block (``m``, ``m``); a still
    image is repeated ``T`` times along the temporal axis, as the Qwen2-VL image processor does.
    """
    _check_images(images)
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    if gh * patch_size != h or gw * patch_size != w or gh % merge_size or gw % merge_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size * merge_size = {patch_size * merge_size}")
    x = images.reshape(b, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, m, m, C, P, P)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal_patch_size, patch_size, patch_size)
    return x.reshape(b * gh * gw, c * temporal_patch_size * patch_size * patch_size)


def qwen2vl_preprocess(
    images: Tensor,
    min_pixels: int,
    max_pixels: int,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> tuple[Tensor, Tensor]:
    """``Qwen2VLImageProcessor`` as tensor ops: ``(pixel_values, image_grid_thw)`` for a batch of images.

    All images of a batch share one size, so one ``smart_resize`` serves the batch.
    """
    _check_images(images)
    height, width = smart_resize(
        images.shape[-2], images.shape[-1], factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels
    )
    x = normalize(resize_bicubic(images.float(), (height, width)), mean, std)
    pixel_values = qwen2vl_patchify(x, patch_size, temporal_patch_size, merge_size)
    grid = torch.tensor([1, height // patch_size, width // patch_size], device=images.device)
    return pixel_values, grid.expand(images.shape[0], 3).clone()


def reward_pixels(batch: RewardInput, fallback_decode: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Images in [0, 1] for a pixel reward: the given images, else ``batch.decode(latents)`` (memoised by the
    caller), else ``fallback_decode`` (the attached generator's VAE) when the batch carries no decoder."""
    if batch.images is None and batch.decode is None and batch.latents is not None and fallback_decode is not None:
        return fallback_decode(batch.latents)
    return batch.pixels()
