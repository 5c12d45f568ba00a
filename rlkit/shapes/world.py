"""The Shapes world: procedurally drawn 32x32 pictures of one coloured shape, with captions.

A scene is a shape (circle, square, triangle, cross) of a palette colour at one of nine positions (a 3x3
grid) on a low-saturation background, drawn with soft edges from signed distance functions, with
jitter of position, size, colour and a little pixel noise. Its caption names the colour, the shape and
the position: ``"a red circle at the top left"``.

Held out: six (colour, shape) pairs, at all nine positions (54 prompts), never appear in any training
stage (VAE, generator, CLIP reward, preference pairs); they are the evaluation prompts
(:data:`HELDOUT_PAIRS`, :func:`heldout_prompts`). Everything is seeded: the same seed draws the same
scenes, bit for bit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

IMAGE_SIZE = 32
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.75, 0.20),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.60, 0.18, 0.80),
    "cyan": (0.10, 0.85, 0.90),
}
SHAPES = ("circle", "square", "triangle", "cross")
# (row, column) on the 3x3 grid -> words; row 0 is the top
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
# every colour and every shape is held out in some pair, so evaluation needs composition, not memory
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("green", "cross"), ("blue", "circle"),
    ("yellow", "square"), ("purple", "cross"), ("cyan", "triangle"),
)
# Every word of every caption, longest first: the tiny CLIP tokenizer then makes each word one token
VOCABULARY = tuple(sorted(
    dict.fromkeys(list(SHAPES) + " ".join(POSITIONS).split() + list(COLORS) + ["at", "the", "a"]),
    key=len, reverse=True,
))
CROSS_ARM_FRACTION = 0.38  # arm width of a cross as a fraction of its extent


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.position)


def caption(color: str, shape: str, position: str) -> str:
    return f"a {color} {shape} at the {position}"


def parse_caption(text: str) -> Scene:
    """The attributes named by a caption of this world; ``ValueError`` naming the part that is missing."""
    words = text.lower().replace(",", " ").split()
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    vertical = next((w for w in words if w in ("top", "bottom")), "")
    horizontal = next((w for w in words if w in ("left", "right")), "")
    position = " ".join(p for p in (vertical, horizontal) if p) or ("center" if "center" in words else "")
    missing = [name for name, v in (("colour", color), ("shape", shape), ("position", position)) if not v]
    if missing:
        raise ValueError(f"caption {text!r} names no {', no '.join(missing)} of the Shapes world")
    return Scene(color, shape, position)


def all_scenes() -> list[Scene]:
    return [Scene(c, s, p) for c, s, p in itertools.product(COLORS, SHAPES, POSITIONS)]


def is_heldout(scene: Scene) -> bool:
    return (scene.color, scene.shape) in HELDOUT_PAIRS


def train_scenes() -> list[Scene]:
    return [s for s in all_scenes() if not is_heldout(s)]


def heldout_scenes() -> list[Scene]:
    return [s for s in all_scenes() if is_heldout(s)]


def train_prompts() -> list[str]:
    return [s.caption for s in train_scenes()]


def heldout_prompts() -> list[str]:
    """The fixed evaluation prompts (54): every held-out (colour, shape) pair at every position."""
    return [s.caption for s in heldout_scenes()]


@dataclass(frozen=True)
class DrawConfig:
    """Jitter of the drawing; all lengths in pixels of a ``IMAGE_SIZE`` picture."""

    size: int = IMAGE_SIZE
    radius_range: tuple[float, float] = (4.0, 5.5)  # half extent of the shape
    cell_centers: tuple[float, float, float] = (7.0, 16.0, 25.0)  # shape centre per grid row / column
    position_jitter: float = 1.5
    color_jitter: float = 0.05
    background_range: tuple[float, float] = (0.1, 0.9)  # grey level of the background
    background_tint: float = 0.06  # per-channel jitter of the background around its grey
    softness_range: tuple[float, float] = (0.6, 1.2)  # edge width
    pixel_noise: float = 0.005  # small: at 0.02 the noise outweighs the edges in high-frequency energy
    # share of pictures whose shape is drawn at ``undersized_radius_range`` instead: pretraining data in which a
    # caption does not pin the size down (GeneratorTrainConfig.undersized_share says why). 0 draws exactly the
    # pictures drawn before the field existed (no extra random draw)
    undersized_share: float = 0.0
    undersized_radius_range: tuple[float, float] = (2.0, 2.6)

    def __post_init__(self) -> None:
        for name in ("radius_range", "undersized_radius_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"DrawConfig.{name} must be 0 < low <= high, got {getattr(self, name)}")
        if not 0 <= self.undersized_share <= 1:
            raise ValueError(f"DrawConfig.undersized_share must be in [0, 1], got {self.undersized_share}")
        hi = max(self.radius_range[1], self.undersized_radius_range[1])
        # a shape's box around its cell centre; a triangle, raised by r/3 to put its centroid there, may clip its
        # apex by up to that much in the top row (by <= 1.8 px in the default world, which the judges read alike)
        reach = self.position_jitter + hi
        if min(self.cell_centers) - reach < 0 or max(self.cell_centers) + reach > self.size:
            raise ValueError("DrawConfig.cell_centers: a shape at the edge cells would leave the picture")
        if self.pixel_noise < 0 or self.color_jitter < 0:
            raise ValueError("DrawConfig.pixel_noise and color_jitter must be >= 0")


def shape_sdf(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Signed distance (pixels, negative inside, approximate) of a shape with half extents ``rx, ry``.

    Used both to draw scenes and, fitted to a bounding box, as the golden judge's templates. The
    triangle points up with its base at ``cy + ry`` and apex at ``cy - ry``.
    """
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return (np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) - 1.0) * min(rx, ry)
    if shape == "square":
        return np.maximum(np.abs(dx) - rx, np.abs(dy) - ry)
    if shape == "triangle":
        # half-planes: base (y <= cy + ry) and the two slanted sides through the apex
        base = dy - ry
        norm = np.sqrt((2 * ry) ** 2 + rx**2)
        side = (2 * ry * np.abs(dx) - rx * (dy + ry)) / norm
        return np.maximum(base, side)
    if shape == "cross":
        ax, ay = CROSS_ARM_FRACTION * rx, CROSS_ARM_FRACTION * ry
        horizontal = np.maximum(np.abs(dx) - rx, np.abs(dy) - ay)
        vertical = np.maximum(np.abs(dx) - ax, np.abs(dy) - ry)
        return np.minimum(horizontal, vertical)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(coords, coords, indexing="xy")


def draw(scene: Scene, rng: np.random.Generator, config: DrawConfig = DrawConfig()) -> np.ndarray:
    """One picture ``(3, H, W)`` float32 in [0, 1] of ``scene``, jittered by ``rng``."""
    undersized = config.undersized_share > 0 and rng.random() < config.undersized_share
    xs, ys = _grid(config.size)
    row, col = POSITIONS[scene.position]
    cx = config.cell_centers[col] + rng.uniform(-config.position_jitter, config.position_jitter)
    cy = config.cell_centers[row] + rng.uniform(-config.position_jitter, config.position_jitter)
    r = rng.uniform(*(config.undersized_radius_range if undersized else config.radius_range))
    if scene.shape == "triangle":  # move the triangle so that its centroid (not its box centre) is at (cx, cy)
        cy -= r / 3
    softness = rng.uniform(*config.softness_range)
    alpha = np.clip(0.5 - shape_sdf(scene.shape, xs, ys, cx, cy, r, r) / softness, 0.0, 1.0)[None]
    fg = np.asarray(COLORS[scene.color]) + rng.uniform(-config.color_jitter, config.color_jitter, 3)
    grey = rng.uniform(*config.background_range)
    bg = grey + rng.uniform(-config.background_tint, config.background_tint, 3)
    image = alpha * fg[:, None, None] + (1 - alpha) * bg[:, None, None]
    image = image + rng.normal(0.0, config.pixel_noise, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def sample_scenes(n: int, rng: np.random.Generator, split: str = "train") -> list[Scene]:
    """``n`` scenes drawn uniformly from the split's attribute combinations (``train`` or ``heldout``)."""
    pool = {"train": train_scenes, "heldout": heldout_scenes}.get(split)
    if pool is None:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    scenes = pool()
    return [scenes[i] for i in rng.integers(0, len(scenes), n)]


def draw_batch(scenes: list[Scene], seed: int, config: DrawConfig = DrawConfig()) -> torch.Tensor:
    """Pictures ``(B, 3, H, W)`` of ``scenes``; picture ``i`` depends only on ``(seed, i)``."""
    images = [draw(s, np.random.default_rng([seed, i]), config) for i, s in enumerate(scenes)]
    return torch.from_numpy(np.stack(images))


def _examples(seed: int, split: str, num_examples: int, config: DrawConfig) -> Iterator[dict]:
    scene_rng = np.random.default_rng([seed, 0])
    for i in range(num_examples):
        scene = sample_scenes(1, scene_rng, split)[0]
        image = draw(scene, np.random.default_rng([seed, 1, i]), config)
        yield {"image": image, "caption": scene.caption, "color": scene.color, "shape": scene.shape,
               "position": scene.position}


def shapes_dataset(num_examples: int, seed: int = 0, split: str = "train", config: DrawConfig = DrawConfig()):
    """A ``datasets.IterableDataset`` streaming ``num_examples`` drawn examples of ``split``.

    Columns: ``image`` (3, H, W float32 in [0, 1]), ``caption``, ``color``, ``shape``, ``position``.
    The stream is a pure function of ``(seed, split, num_examples, config)``.
    """
    import datasets

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    features = datasets.Features({
        "image": datasets.Array3D(shape=(3, config.size, config.size), dtype="float32"),
        "caption": datasets.Value("string"),
        "color": datasets.Value("string"),
        "shape": datasets.Value("string"),
        "position": datasets.Value("string"),
    })
    return datasets.IterableDataset.from_generator(
        _examples, features=features,
        gen_kwargs={"seed": seed, "split": split, "num_examples": num_examples, "config": config},
    )


def batches(dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """``(images (B, 3, H, W), captions)`` batches of a :func:`shapes_dataset` stream."""
    for batch in dataset.with_format("numpy").iter(batch_size=batch_size):
        yield torch.as_tensor(np.asarray(batch["image"], dtype=np.float32)), [str(c) for c in batch["caption"]]
