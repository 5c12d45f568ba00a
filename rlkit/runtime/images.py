"""Image grids as PNG files (PIL), with optional captions under each image."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PADDING = 2  # pixels between tiles
BACKGROUND = (255, 255, 255)
CAPTION_COLOUR = (0, 0, 0)
CAPTION_LINE_HEIGHT = 11  # PIL's default bitmap font
CAPTION_CHAR_WIDTH = 6
CAPTION_MAX_LINES = 3


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` floats in [0, 1] (values outside are clamped) -> a list of RGB PIL images."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in array]


def make_image_grid(images: torch.Tensor, nrow: int | None = None, captions: list[str] | None = None) -> Image.Image:
    """One PIL image with the batch laid out ``nrow`` per row (default: a near-square grid)."""
    tiles = to_pil(images)
    if captions is not None and len(captions) != len(tiles):
        raise ValueError(f"got {len(captions)} captions for {len(tiles)} images")
    n = len(tiles)
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    width, height = tiles[0].size
    wrap = max(1, width // CAPTION_CHAR_WIDTH)
    lines = [textwrap.wrap(c, wrap)[:CAPTION_MAX_LINES] for c in captions] if captions else []
    caption_h = CAPTION_LINE_HEIGHT * max((len(l) for l in lines), default=0)
    cell_w, cell_h = width + PADDING, height + caption_h + PADDING
    grid = Image.new("RGB", (cols * cell_w + PADDING, rows * cell_h + PADDING), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, tile in enumerate(tiles):
        x = PADDING + (i % cols) * cell_w
        y = PADDING + (i // cols) * cell_h
        grid.paste(tile, (x, y))
        for j, line in enumerate(lines[i] if lines else []):
            draw.text((x, y + height + j * CAPTION_LINE_HEIGHT), line, fill=CAPTION_COLOUR, font=font)
    return grid


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
                    captions: list[str] | None = None) -> Path:
    """Writes ``images`` (``(B, 3, H, W)`` in [0, 1]) as one PNG grid; creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, nrow, captions).save(path, format="PNG")
    return path
