"""Judges of the Shapes world: the annotators, the golden judge, realism guards and the CLIP reward.

- :func:`read_scenes` reads a picture analytically (no learning): it segments the prompt's colour, keeps
  the largest connected blob, reads the shape by fitting each shape's template to the blob's bounding
  box (the best intersection-over-union; fill of the box and area decide it) and the position from
  the blob's centroid on the 3x3 grid.
- :class:`GoldenJudgeReward` (``shapes-golden``) scores that reading; it is for evaluation only. It is
  analytic on purpose: two learned CNNs share blind spots, so a learned proxy reward can be hacked in
  ways a learned judge would not notice. It also checks what the annotators do not (:func:`golden_correct`):
  one object in the picture, and a blob as wide as it is tall (every shape of the world is), so that the
  reward models, which learn from the annotators, do not share all of its blind spots.
- :class:`AnnotatorJudge` are the "humans" that label preference pairs: each perceives an attribute
  score plus Gaussian noise (Thurstone), so ``P(a > b) = Phi((s_a - s_b) / sqrt(2 var))``.
- :func:`realism_ratios`: foreground area and high-frequency energy relative to real pictures (1 = real).
- :class:`ShapesClipReward` (``shapes-clip``): the learned pixel-space CLIP-style reward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.base import Reward, RewardInput, RewardOutput
from rlkit.shapes import world

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
COLOR_TOLERANCE = 0.33  # max RGB distance from the palette colour for a pixel to count as that colour
MIN_AREA = 12.0  # pixels: a smaller blob is no shape (the smallest drawn triangle covers ~35)
MAX_AREA = 200.0  # pixels: a larger blob is no shape (the largest drawn square covers ~121)
MIN_SHAPE_IOU = 0.55  # the best template must fit at least this well to name a shape
FOREGROUND_TOLERANCE = 0.15  # RGB distance from the border colour below which a pixel is never foreground
FOREGROUND_CONTRAST = 0.5  # ... and the share of the way to the picture's most distant colour it must reach
FOREGROUND_PEAK_QUANTILE = 0.995  # "most distant colour": past a few outlying pixels
ATTRIBUTES = ("color", "shape", "position")
SHAPE_FIT_WEIGHT = 0.4  # share of the graded template fit in what annotators value
ASPECT_RANGE = (0.75, 1.33)  # blob box height / width the golden judge accepts (every drawn shape spans 1)


@dataclass
class Reading:
    """What the analytic reader sees in each picture, given the colour its prompt asks for."""

    area: Tensor  # (B,) pixels of the largest blob of the prompt's colour
    shape: list[str | None]  # best-fitting template, None when nothing fits
    shape_iou: Tensor  # (B,) IoU of the prompt's own shape template with the blob
    position: list[str | None]  # grid cell of the blob's centroid
    correct: dict[str, Tensor]  # attribute -> (B,) bool, for the prompt's scene
    aspect: Tensor  # (B,) the blob's box height / width (nan without a blob of MIN_AREA)
    other_area: Tensor  # (B,) pixels of the largest foreground object besides the blob (and its rim)

    @property
    def fraction(self) -> Tensor:
        return _golden_score(self.correct, "fraction")

    @property
    def all_correct(self) -> Tensor:
        return _golden_score(self.correct, "all")


def _color_masks(images: Tensor, colors: list[str]) -> Tensor:
    """``(B, H, W)`` bool: pixels nearest to the asked palette colour, within tolerance."""
    palette = torch.tensor(list(world.COLORS.values()), dtype=images.dtype, device=images.device)  # (P, 3)
    dist = (images[:, None] - palette[None, :, :, None, None]).norm(dim=2)  # (B, P, H, W)
    names = list(world.COLORS)
    idx = torch.tensor([names.index(c) for c in colors], device=images.device)
    asked = dist[torch.arange(len(colors)), idx]
    return (dist.argmin(1) == idx[:, None, None]) & (asked < COLOR_TOLERANCE)


def _largest_component(masks: Tensor) -> Tensor:
    """Keeps the largest 8-connected blob of each mask (label propagation by max-pooling)."""
    b, h, w = masks.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(b, h, w)
    labels = torch.where(masks, ids, torch.zeros(()))
    for _ in range(h * w):
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * masks
        if torch.equal(grown, labels):
            break
        labels = grown
    keep = torch.zeros_like(masks)
    for i in range(b):
        values, counts = labels[i][masks[i]].unique(return_counts=True)
        if len(values):
            keep[i] = labels[i] == values[counts.argmax()]
    return keep


def _alpha_maps(images: Tensor, colors: list[str]) -> Tensor:
    """``(B, H, W)`` in [0, 1]: how far each pixel lies from the background towards the asked colour.

    The background is the median border colour; soft edges get fractional coverage, which lets the
    templates be compared below pixel resolution.
    """
    palette = torch.tensor([world.COLORS[c] for c in colors], dtype=images.dtype, device=images.device)
    background = _border_colour(images)
    direction = palette - background  # (B, 3)
    along = ((images - background[..., None, None]) * direction[..., None, None]).sum(1)
    return (along / direction.pow(2).sum(-1).clamp_min(1e-6)[:, None, None]).clamp(0, 1)


def _template_ious(soft: np.ndarray, blob: np.ndarray) -> dict[str, float]:
    """Soft IoU of a blob's coverage with each shape's template fitted to the blob's bounding box."""
    ys, xs = np.nonzero(blob)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    gx, gy = np.meshgrid(np.arange(soft.shape[1]) + 0.5, np.arange(soft.shape[0]) + 0.5, indexing="xy")
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    out = {}
    for shape in world.SHAPES:
        t = np.clip(0.5 - world.shape_sdf(shape, gx, gy, cx, cy, rx, ry), 0.0, 1.0)
        out[shape] = float(np.minimum(t, soft).sum() / np.maximum(t, soft).sum())
    return out


def _position_of(cx: float, cy: float, size: int) -> str:
    col, row = min(int(3 * cx / size), 2), min(int(3 * cy / size), 2)
    return next(name for name, rc in world.POSITIONS.items() if rc == (row, col))


@torch.no_grad()
def read_scenes(images: Tensor, prompts: list[str]) -> Reading:
    """Analytic reading of ``images`` (B, 3, H, W) in [0, 1] against the scenes their ``prompts`` ask for."""
    asked = [world.parse_caption(p) for p in prompts]
    images = images.detach().float().cpu()
    colors = [s.color for s in asked]
    blobs = _largest_component(_color_masks(images, colors))
    # coverage of the blob and its one-pixel rim (the soft edge), zero elsewhere
    rim = F.max_pool2d(blobs[:, None].float(), 3, stride=1, padding=1)[:, 0]
    soft = (_alpha_maps(images, colors) * rim).numpy()
    size = images.shape[-1]
    area = blobs.flatten(1).sum(1).float()
    shapes: list[str | None] = []
    positions: list[str | None] = []
    prompt_iou = torch.zeros(len(prompts))
    aspect = torch.full((len(prompts),), math.nan)
    for i, scene in enumerate(asked):
        if area[i] < MIN_AREA:
            shapes.append(None)
            positions.append(None)
            continue
        mask = blobs[i].numpy()
        covered = soft[i] > 0.5
        ious = _template_ious(soft[i], covered if covered.any() else mask)
        best = max(ious, key=ious.get)
        plausible = ious[best] >= MIN_SHAPE_IOU and area[i] <= MAX_AREA
        shapes.append(best if plausible else None)
        prompt_iou[i] = ious[scene.shape] if area[i] <= MAX_AREA else 0.0
        ys, xs = np.nonzero(mask)
        positions.append(_position_of(xs.mean() + 0.5, ys.mean() + 0.5, size))
        aspect[i] = (ys.max() - ys.min() + 1) / (xs.max() - xs.min() + 1)
    correct = {
        "color": area >= MIN_AREA,
        "shape": torch.tensor([s == a.shape for s, a in zip(shapes, asked)]),
        "position": torch.tensor([p == a.position for p, a in zip(positions, asked)]),
    }
    others = _foreground_mask(images) & (rim == 0)
    other_area = _largest_component(others).flatten(1).sum(1).float()
    return Reading(area=area, shape=shapes, shape_iou=prompt_iou, position=positions, correct=correct,
                   aspect=aspect, other_area=other_area)


def _golden_score(correct: dict[str, Tensor], mode: str) -> Tensor:
    """``(B,)`` float: every attribute of ``correct`` right (``"all"``), or the share right (``"fraction"``)."""
    stacked = torch.stack([correct[a] for a in ATTRIBUTES]).float()
    return stacked.min(0).values if mode == "all" else stacked.mean(0)


def golden_correct(reading: Reading) -> dict[str, Tensor]:
    """The golden judge's verdict per attribute: the reading's, where the picture holds one object (a second one
    of at least ``MIN_AREA`` pixels fails every attribute) whose box is about as wide as tall (else its shape is
    wrong: a rectangle is not a square, an ellipse not a circle). The annotators do not check either."""
    single = reading.other_area < MIN_AREA
    square = (reading.aspect >= ASPECT_RANGE[0]) & (reading.aspect <= ASPECT_RANGE[1])
    return {"color": reading.correct["color"] & single, "shape": reading.correct["shape"] & square & single,
            "position": reading.correct["position"] & single}


GOLDEN_MODES = ("all", "fraction", "utility")


def golden_scores(images: Tensor, prompts: list[str], mode: str = "all") -> Tensor:
    """``(B,)`` in [0, 1] of a reading (:func:`reading_score`)."""
    return reading_score(read_scenes(images, prompts), mode)


def reading_score(reading: Reading, mode: str = "all") -> Tensor:
    """All attributes correct (``"all"``), the fraction correct (``"fraction"``), both by :func:`golden_correct`,
    or the annotators' noiseless utility (``"utility"``, :func:`utility_of`: what a perfect reward model of the
    preference set returns)."""
    if mode in ("all", "fraction"):
        return _golden_score(golden_correct(reading), mode)
    if mode == "utility":
        return utility_of(reading)
    raise ValueError(f"golden judge mode must be one of {GOLDEN_MODES}, got {mode!r}")


class GoldenJudgeReward(Reward):
    """``shapes-golden``: the analytic judge as a reward, for evaluation only (not differentiable).

    The one exception is an oracle arm, labelled as such: ``mode: utility`` trains on the annotators' noiseless
    utility, what a perfect reward model of the preference set would return (``rlkit demo --oracle``).
    """

    space = "pixel"
    noise_aware = False
    differentiable = False

    def __init__(self, mode: str = "all"):
        super().__init__()
        if mode not in GOLDEN_MODES:
            raise ValueError(f"GoldenJudgeReward.mode must be one of {GOLDEN_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, batch: RewardInput) -> RewardOutput:
        images = batch.pixels()
        reading = read_scenes(images, batch.prompts)
        golden = golden_correct(reading)
        extras = {f"{a}_correct": golden[a].float() for a in ATTRIBUTES}
        extras.update(fraction=_golden_score(golden, "fraction"), all_correct=_golden_score(golden, "all"))
        scores = {"all": extras["all_correct"], "fraction": extras["fraction"]}.get(self.mode)
        if scores is None:
            scores = reading_score(reading, self.mode)
        # realism guards reported beside the score (compare with real pictures' values)
        extras.update(foreground_area=foreground_area(images), high_frequency=high_frequency_energy(images))
        device = images.device
        return RewardOutput(scores=scores.to(device), extras={k: v.to(device) for k, v in extras.items()})


# -- annotators ------------------------------------------------------------------------------------
def annotator_utility(images: Tensor, prompts: list[str]) -> Tensor:
    """What an annotator values, noise-free, in [0, 1].

    Mostly the fraction of attributes right, plus a graded term for how well the blob fits the asked
    shape's template, as a person prefers the better drawn of two pictures that are equally right.
    """
    return utility_of(read_scenes(images, prompts))


def utility_of(reading: Reading) -> Tensor:
    """:func:`annotator_utility` of pictures already read (:func:`read_scenes`)."""
    return (1 - SHAPE_FIT_WEIGHT) * reading.fraction + SHAPE_FIT_WEIGHT * reading.shape_iou


@dataclass
class AnnotatorConfig:
    noise_std: float = 0.02  # std of each annotator's perception of an image's utility
    # an annotator who perceives two pictures closer than this calls the pair a tie (label 0.5), as the
    # annotators of Pick-a-Pic and HPDv3 may; the preference set drops pairs its first labelling calls a tie
    tie_margin: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.noise_std < 0:
            raise ValueError(f"AnnotatorConfig.noise_std must be >= 0, got {self.noise_std}")
        if self.tie_margin < 0:
            raise ValueError(f"AnnotatorConfig.tie_margin must be >= 0, got {self.tie_margin}")


class AnnotatorJudge:
    """Noisy "human" labels of preference pairs (Thurstone case V, with an optional tie margin)."""

    def __init__(self, config: AnnotatorConfig | None = None):
        self.config = config or AnnotatorConfig()

    def outcome_probabilities(self, utility_a: Tensor, utility_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(P(a preferred), P(b preferred), P(tie))``: a wins when ``s_a - s_b > margin`` as perceived.

        The perceived difference is ``N(s_a - s_b, 2 var)``, so ``P(a) = Phi((s_a - s_b - margin) / sqrt(2 var))``.
        """
        diff, margin, var = utility_a - utility_b, self.config.tie_margin, self.config.noise_std**2
        if var == 0:
            win_a, win_b = (diff > margin).float(), (-diff > margin).float()
        else:
            scale = math.sqrt(2 * var)
            win_a = 0.5 * (1 + torch.erf((diff - margin) / scale / math.sqrt(2)))
            win_b = 0.5 * (1 + torch.erf((-diff - margin) / scale / math.sqrt(2)))
        if margin == 0 and var == 0:  # equal utilities: a coin flip, not a tie
            win_a = win_a + 0.5 * (diff == 0).float()
            win_b = win_b + 0.5 * (diff == 0).float()
        return win_a, win_b, 1 - win_a - win_b

    def preference_probability(self, utility_a: Tensor, utility_b: Tensor) -> Tensor:
        """``P(a preferred over b)``, a tie counting as half: ``Phi((s_a - s_b) / sqrt(2 var))`` without margin."""
        win_a, _, tie = self.outcome_probabilities(utility_a, utility_b)
        return win_a + 0.5 * tie

    def label(self, utility_a: Tensor, utility_b: Tensor, generator: torch.Generator) -> Tensor:
        """One labelling: ``(B,)`` 1.0 where the annotator prefers ``a``, 0.0 for ``b``, 0.5 for a tie.

        Each item gets its own perception noise.
        """
        std = self.config.noise_std
        seen_a = utility_a + std * torch.randn(utility_a.shape, generator=generator)
        seen_b = utility_b + std * torch.randn(utility_b.shape, generator=generator)
        diff = seen_a - seen_b
        if self.config.tie_margin == 0:
            labels = (diff > 0).float()
            tied = diff == 0  # equal as perceived (noise_std 0): a coin flip, as outcome_probabilities has it
            if tied.any():
                labels[tied] = (torch.rand(int(tied.sum()), generator=generator) < 0.5).float()
            return labels
        return torch.where(diff.abs() <= self.config.tie_margin, 0.5, (diff > 0).float())

    def label_images(self, images_a: Tensor, images_b: Tensor, prompts: list[str],
                     generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``(labels, utility_a, utility_b)`` for pairs of pictures of the same prompts."""
        ua, ub = annotator_utility(images_a, prompts), annotator_utility(images_b, prompts)
        return self.label(ua, ub, generator), ua, ub

    def consistency_ceiling(self, utility_a: Tensor, utility_b: Tensor) -> float:
        """Expected agreement of a second labelling with a first one, over pairs the first did not call a tie.

        Per pair, ``(P(a)^2 + P(b)^2 + P(tie) (P(a) + P(b)) / 2) / (P(a) + P(b))``: the second labelling's
        tie counts half. Without a margin this is ``p^2 + (1 - p)^2``.
        """
        win_a, win_b, tie = self.outcome_probabilities(utility_a, utility_b)
        decided = (win_a + win_b).clamp_min(1e-12)
        return float(((win_a**2 + win_b**2 + 0.5 * tie * decided) / decided).mean())


# -- realism guards --------------------------------------------------------------------------------
def _border_colour(images: Tensor) -> Tensor:
    """``(B, 3)`` median colour of the outermost pixels: the background of a Shapes picture."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    return border.median(dim=-1).values


def foreground_area(images: Tensor) -> Tensor:
    """``(B,)`` fraction of pixels inside the half-contrast contour between background and foreground.

    A pixel is foreground when its RGB distance from the border colour (the background) is at least
    ``FOREGROUND_CONTRAST`` of the distance of the picture's most distant colour, and above
    ``FOREGROUND_TOLERANCE`` (so a blank picture has none). Blur spreads a shape's colour past its edge
    but leaves that contour where it was, so this guard measures the size of what is drawn and leaves
    sharpness to :func:`high_frequency_energy`. A fixed threshold near the background (the earlier guard)
    counts the blurred rim as area: the shipped generator's soft samples of held-out prompts read 1.18x
    real pictures that way, and 0.96x by the contour.
    """
    return _foreground_mask(images).flatten(1).float().mean(1)


def _foreground_mask(images: Tensor) -> Tensor:
    """``(B, H, W)`` bool: the pixels inside the half-contrast contour (:func:`foreground_area`)."""
    background = _border_colour(images)
    dist = (images - background[..., None, None]).norm(dim=1)
    peak = dist.flatten(1).quantile(FOREGROUND_PEAK_QUANTILE, dim=1)
    threshold = (FOREGROUND_CONTRAST * peak).clamp_min(FOREGROUND_TOLERANCE)
    return dist > threshold[:, None, None]


def high_frequency_energy(images: Tensor) -> Tensor:
    """``(B,)`` mean squared response of a 3x3 Laplacian per channel (texture, noise and edge energy)."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=images.dtype,
                          device=images.device).expand(images.shape[1], 1, 3, 3)
    lap = F.conv2d(images, kernel, groups=images.shape[1])
    return lap.pow(2).flatten(1).mean(1)


@torch.no_grad()
def realism_ratios(images: Tensor, reference: Tensor) -> dict[str, float]:
    """Guards beside the golden judge: each statistic of ``images`` over that of real ``reference`` pictures.

    Near 1 is realistic; a policy that paints the whole canvas or hides high-frequency patterns that
    fool a learned reward drifts away from 1 while a proxy score still climbs.
    """
    images, reference = images.detach().float(), reference.detach().float()
    return {
        "foreground_area": float(foreground_area(images).mean() / foreground_area(reference).mean()),
        "high_frequency": float(high_frequency_energy(images).mean() / high_frequency_energy(reference).mean()),
    }


# -- learned CLIP-style reward ---------------------------------------------------------------------
class ShapesClipReward(Reward):
    """``shapes-clip``: cosine similarity of the CLIP-style model's image and caption embeddings.

    Reads pixels (decoding latents through ``batch.decode`` when needed) and is differentiable with
    respect to them, so ReFL can use it. ``path`` is a folder saved by ``ShapesClipModel.save_pretrained``;
    by default the checkpoint shipped with rlkit.
    """

    space = "pixel"
    noise_aware = False
    differentiable = True

    def __init__(self, path: str | Path | None = None, scale: float = 1.0):
        super().__init__()
        from rlkit.models.sd3 import explain_missing
        from rlkit.shapes.clip import ShapesClipModel

        source = str(path or ASSETS_DIR / "clip")
        try:
            self.model = ShapesClipModel.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise explain_missing(source, exc, "Shapes CLIP reward") from None
        self.model.eval().requires_grad_(False)
        self.scale = scale

    def forward(self, batch: RewardInput) -> RewardOutput:
        images = batch.pixels()
        self.model.to(images.device)
        raw = self.model.similarity(images.float(), batch.prompts)
        return RewardOutput(scores=self.scale * raw, extras={"clip_cosine": raw.detach()})
