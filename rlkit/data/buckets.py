"""Aspect-ratio buckets: every image is resized (and centre-cropped) to the nearest allowed size.

As in the DiNa-LRM release: a bucket is eligible when its log aspect ratio is within ``ar_threshold`` of
the image's, and among those the one with the closest (log) area wins; images under ``min_pixels``
(256² for the real recipe) are dropped; the two images of a pair share one bucket (the larger one's) so that
their latents can be compared token by token, and a pair whose images cannot share one is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# (height, width) of the release's buckets: 1:1, 3:2, 2:3, 4:3, 3:4, 16:9, 9:16 and two more
RELEASE_BUCKETS: tuple[tuple[int, int], ...] = (
    (256, 256), (512, 512), (1024, 1024),
    (1248, 832), (1344, 896), (832, 1248), (896, 1344),
    (1024, 768), (768, 1024), (1472, 832), (832, 1472), (1152, 832), (832, 1152),
)
RELEASE_AR_THRESHOLD = 0.03
RELEASE_MIN_PIXELS = 256 * 256


@dataclass
class BucketConfig:
    """Allowed image sizes. ``divisible``: every bucket side must be a multiple (VAE factor x patch size)."""

    sizes: list[tuple[int, int]] = field(default_factory=lambda: list(RELEASE_BUCKETS))
    ar_threshold: float = RELEASE_AR_THRESHOLD  # |log(aspect_bucket) - log(aspect_image)|
    min_pixels: int = RELEASE_MIN_PIXELS  # images with fewer pixels are dropped; 0 keeps all
    divisible: int = 16

    def __post_init__(self) -> None:
        self.sizes = [tuple(int(v) for v in s) for s in self.sizes]  # type: ignore[misc]
        if not self.sizes:
            raise ValueError("BucketConfig.sizes: needs at least one (height, width)")
        for s in self.sizes:
            if len(s) != 2 or min(s) <= 0:
                raise ValueError(f"BucketConfig.sizes: {list(s)} is not a positive (height, width)")
            if self.divisible > 0 and (s[0] % self.divisible or s[1] % self.divisible):
                raise ValueError(f"BucketConfig.sizes: {list(s)} is not divisible by {self.divisible}")
        if self.ar_threshold < 0:
            raise ValueError(f"BucketConfig.ar_threshold: must be >= 0, got {self.ar_threshold}")
        if self.min_pixels < 0:
            raise ValueError(f"BucketConfig.min_pixels: must be >= 0, got {self.min_pixels}")

    def assign(self, height: int, width: int) -> tuple[int, int] | None:
        """The bucket for an image of this size, or None (too small, or no bucket with its aspect)."""
        if height * width < self.min_pixels:
            return None
        aspect = math.log(height / width)
        candidates = [s for s in self.sizes if abs(math.log(s[0] / s[1]) - aspect) <= self.ar_threshold]
        if not candidates:
            return None
        area = math.log(height * width)
        return min(candidates, key=lambda s: abs(math.log(s[0] * s[1]) - area))

    def assign_pair(self, size_a: tuple[int, int], size_b: tuple[int, int]) -> tuple[int, int] | None:
        """One bucket for both images (``(height, width)`` each): the larger of their buckets that fits both, as
        the release scales the smaller image up to the larger one's edge (a 512² image paired with a 1024² one
        trains at 1024², not the 1024² one at 512²)."""
        a, b = self.assign(*size_a), self.assign(*size_b)
        if a is None or b is None:
            return None
        if a == b:
            return a
        for bucket in sorted((a, b), key=lambda s: -s[0] * s[1]):
            aspect = math.log(bucket[0] / bucket[1])
            if all(abs(math.log(h / w) - aspect) <= self.ar_threshold for h, w in (size_a, size_b)):
                return bucket
        return None


def resize_to_bucket(image, bucket: tuple[int, int]):
    """Resize (Lanczos) so the image covers ``bucket`` (height, width), then centre-crop to it."""
    from PIL import Image

    height, width = bucket
    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))
