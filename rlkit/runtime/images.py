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
MIN_CAPTIONED_WIDTH = 96  # narrower captioned tiles are enlarged (nearest neighbour): 16 caption characters a line


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` floats in [0, 1] (values outside are clamped) -> a list of RGB PIL images."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in array]


def caption_lines(caption: str, width: int) -> list[str]:
    """``caption`` wrapped to a tile ``width`` pixels wide, at most ``CAPTION_MAX_LINES`` lines; a caption cut short
    ends in ``...``."""
    chars = max(4, width // CAPTION_CHAR_WIDTH)
    lines = textwrap.wrap(caption, chars)
    if len(lines) > CAPTION_MAX_LINES:
        lines = lines[:CAPTION_MAX_LINES]
        lines[-1] = lines[-1][: chars - 3] + "..."
    return lines


def make_image_grid(images: torch.Tensor, nrow: int | None = None, captions: list[str] | None = None) -> Image.Image:
    """One PIL image with the batch laid out ``nrow`` per row (default: a near-square grid).

    With ``captions``, tiles narrower than ``MIN_CAPTIONED_WIDTH`` are enlarged by a whole factor (nearest
    neighbour, so pixels stay sharp) so that a caption under a 32x32 picture stays readable.
    """
    tiles = to_pil(images)
    if captions is not None and len(captions) != len(tiles):
        raise ValueError(f"got {len(captions)} captions for {len(tiles)} images")
    n = len(tiles)
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    width, height = tiles[0].size
    if captions and width < MIN_CAPTIONED_WIDTH:
        factor = math.ceil(MIN_CAPTIONED_WIDTH / width)
        width, height = width * factor, height * factor
        tiles = [t.resize((width, height), Image.Resampling.NEAREST) for t in tiles]
    lines = [caption_lines(c, width) for c in captions] if captions else []
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
