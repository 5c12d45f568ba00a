"""Judges of the Shapes world: golden judge accuracy, annotator statistics, realism guards, CLIP reward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rewards
from rewards.base import MemoDecode, RewardInput
from rlkit.shapes import judges, world


@pytest.fixture(scope="module")
def drawn():
    rng = np.random.default_rng(11)
    scenes = world.sample_scenes(80, rng, "train") + world.sample_scenes(40, rng, "heldout")
    return world.draw_batch(scenes, seed=11), scenes


def _next(items, item, step=1):
    items = list(items)
    return items[(items.index(item) + step) % len(items)]


def test_golden_judge_reads_drawn_pictures(drawn):
    images, scenes = drawn
    reading = judges.read_scenes(images, [s.caption for s in scenes])
    assert reading.all_correct.mean() >= 0.97
    for attribute in judges.ATTRIBUTES:
        assert reading.correct[attribute].float().mean() >= 0.97, attribute
    assert sum(r == s.shape for r, s in zip(reading.shape, scenes)) >= 0.97 * len(scenes)


def test_golden_judge_scores_low_for_wrong_attributes(drawn):
    images, scenes = drawn
    wrong_shape = [world.caption(s.color, _next(world.SHAPES, s.shape), s.position) for s in scenes]
    wrong_color = [world.caption(_next(world.COLORS, s.color), s.shape, s.position) for s in scenes]
    wrong_place = [world.caption(s.color, s.shape, _next(world.POSITIONS, s.position, 4)) for s in scenes]
    assert judges.golden_scores(images, wrong_shape).mean() <= 0.05
    assert judges.golden_scores(images, wrong_shape, "fraction").mean() == pytest.approx(2 / 3, abs=0.03)
    assert judges.golden_scores(images, wrong_color, "fraction").mean() <= 0.02  # nothing of that colour
    reading = judges.read_scenes(images, wrong_place)
    assert reading.correct["position"].float().mean() <= 0.02
    assert reading.correct["shape"].float().mean() >= 0.97


def test_golden_judge_rejects_a_painted_canvas_and_an_empty_one():
    full = torch.tensor(world.COLORS["red"]).view(1, 3, 1, 1).expand(2, 3, 32, 32).clone()
    empty = torch.full((2, 3, 32, 32), 0.5)
    prompts = ["a red square at the center"] * 2
    assert judges.golden_scores(full, prompts).sum() == 0  # area far above any drawn shape
    assert judges.golden_scores(empty, prompts, "fraction").sum() == 0


def _painted(shape: str, rx: float, ry: float, extra: tuple[float, float] | None = None) -> torch.Tensor:
    """A red ``shape`` of radii ``rx``, ``ry`` at the centre of a grey 32x32 picture (and a blue disc at ``extra``)."""
    gx, gy = world._grid(32)
    picture = np.full((3, 32, 32), 0.5)
    parts = [("red", shape, 16, 16, rx, ry)] + ([("blue", "circle", *extra, 4, 4)] if extra else [])
    for colour, name, cx, cy, ax, ay in parts:
        alpha = np.clip(0.5 - world.shape_sdf(name, gx, gy, cx, cy, ax, ay) / 0.8, 0.0, 1.0)  # a soft edge
        picture = picture * (1 - alpha) + np.array(world.COLORS[colour])[:, None, None] * alpha
    return torch.tensor(picture, dtype=torch.float32)[None]


def test_the_golden_judge_checks_what_the_annotators_do_not():
    """A rectangle is no square and an ellipse no circle, and a second object makes the picture wrong: the golden
    judge says so, while the annotators (and so the reward models that learn from them) read them as right."""
    cases = {"a red square at the center": [(_painted("square", 5, 5), 1.0), (_painted("square", 5.5, 2.5), 0.0)],
             "a red circle at the center": [(_painted("circle", 5, 5), 1.0), (_painted("circle", 5, 3.5), 0.0),
                                            (_painted("circle", 5, 5, extra=(5, 5)), 0.0)]}
    for prompt, pictures in cases.items():
        for picture, golden in pictures:
            reading = judges.read_scenes(picture, [prompt])
            assert reading.all_correct.item() == 1.0  # what the annotators' reader sees
            assert judges.golden_scores(picture, [prompt]).item() == golden
    two = _painted("circle", 5, 5, extra=(5, 5))
    assert judges.golden_scores(two, ["a red circle at the center"], "fraction").item() == 0.0
    out = rewards.build("shapes-golden")(RewardInput(prompts=["a red square at the center"],
                                                      images=_painted("square", 5.5, 2.5)))
    assert out.extras["shape_correct"].item() == 0.0 and out.extras["color_correct"].item() == 1.0


def test_golden_reward_through_registry_reads_pixels_or_decodes(drawn):
    images, scenes = drawn
    reward = rewards.build("shapes-golden")
    assert isinstance(reward, judges.GoldenJudgeReward)
    assert reward.space == "pixel" and not reward.differentiable
    prompts = [s.caption for s in scenes[:8]]
    out = reward(RewardInput(prompts=prompts, images=images[:8]))
    assert out.scores.shape == (8,) and out.scores.dtype == torch.float32
    assert out.scores.mean() >= 0.85
    assert set(out.extras) >= {"color_correct", "shape_correct", "position_correct", "fraction"}
    # latents with a decode function: the reward decodes once through MemoDecode
    decode = MemoDecode(lambda z: z[:, :3])
    latents = torch.cat([images[:8], torch.zeros(8, 1, 32, 32)], 1)
    by_decode = reward(RewardInput(prompts=prompts, latents=latents, decode=decode))
    assert decode.calls == 1 and torch.equal(by_decode.scores, out.scores)
    fraction = rewards.build("shapes-golden", mode="fraction")(RewardInput(prompts=prompts, images=images[:8]))
    assert (fraction.scores >= out.scores).all()
    with pytest.raises(ValueError, match="mode"):
        judges.GoldenJudgeReward(mode="best")


def test_the_oracle_reward_is_the_annotators_noiseless_utility(drawn):
    images, scenes = drawn
    images = images[:16]
    right = [s.caption for s in scenes[:16]]
    wrong = [world.caption(s.color, _next(world.SHAPES, s.shape), s.position) for s in scenes[:16]]
    oracle = rewards.build("shapes-golden", mode="utility")
    scores = {}
    for name, prompts in (("right", right), ("wrong", wrong)):
        scores[name] = oracle(RewardInput(prompts=prompts, images=images)).scores
        assert torch.allclose(scores[name], judges.annotator_utility(images, prompts))
    assert (scores["right"] > scores["wrong"]).all()
    # graded where the golden judge is not: every wrong shape is 0 to it, but some fit the asked shape better
    assert judges.golden_scores(images, wrong).sum() == 0 and scores["wrong"].std() > 0.01


def test_annotator_labels_follow_thurstone_probabilities():
    annotators = judges.AnnotatorJudge(judges.AnnotatorConfig(noise_std=0.2))
    n = 20000
    for diff in (0.0, 0.1, 0.3):
        ua, ub = torch.full((n,), 0.5 + diff), torch.full((n,), 0.5)
        labels = annotators.label(ua, ub, torch.Generator().manual_seed(0))
        expected = 0.5 * (1 + math.erf(diff / math.sqrt(2 * 0.2**2) / math.sqrt(2)))
        assert labels.mean().item() == pytest.approx(expected, abs=0.015)
        assert annotators.preference_probability(ua[:1], ub[:1]).item() == pytest.approx(expected, abs=1e-6)
    ua, ub = torch.rand(n, generator=torch.Generator().manual_seed(1)), torch.rand(n)
    first = annotators.label(ua, ub, torch.Generator().manual_seed(2))
    again = annotators.label(ua, ub, torch.Generator().manual_seed(2))
    second = annotators.label(ua, ub, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)  # seeded
    agreement = (first == second).float().mean().item()
    assert agreement == pytest.approx(annotators.consistency_ceiling(ua, ub), abs=0.015)
    assert 0.5 < agreement < 1.0
    noiseless = judges.AnnotatorJudge(judges.AnnotatorConfig(noise_std=0.0))
    assert torch.equal(noiseless.label(ua, ub, torch.Generator()), (ua > ub).float())
    equal = torch.full((n,), 0.5)  # equal utilities, no noise: a coin flip, as its probabilities say
    flips = noiseless.label(equal, equal, torch.Generator().manual_seed(4))
    assert noiseless.outcome_probabilities(equal[:1], equal[:1])[0].item() == 0.5
    assert set(flips.tolist()) == {0.0, 1.0} and flips.mean().item() == pytest.approx(0.5, abs=0.015)
    with pytest.raises(ValueError, match="noise_std"):
        judges.AnnotatorConfig(noise_std=-1.0)


def test_annotators_call_close_pairs_ties_and_the_ceiling_counts_them_half():
    annotators = judges.AnnotatorJudge(judges.AnnotatorConfig(noise_std=0.1, tie_margin=0.1))
    n = 40000
    for diff in (0.0, 0.1, 0.3):
        ua, ub = torch.full((n,), 0.5 + diff), torch.full((n,), 0.5)
        labels = annotators.label(ua, ub, torch.Generator().manual_seed(0))
        scale = math.sqrt(2 * 0.1**2)
        win_a = 0.5 * (1 + math.erf((diff - 0.1) / scale / math.sqrt(2)))
        win_b = 0.5 * (1 + math.erf((-diff - 0.1) / scale / math.sqrt(2)))
        assert (labels == 1).float().mean().item() == pytest.approx(win_a, abs=0.01)
        assert (labels == 0).float().mean().item() == pytest.approx(win_b, abs=0.01)
        assert (labels == 0.5).float().mean().item() == pytest.approx(1 - win_a - win_b, abs=0.01)
        probabilities = annotators.outcome_probabilities(ua[:1], ub[:1])
        assert [p.item() for p in probabilities] == pytest.approx([win_a, win_b, 1 - win_a - win_b], abs=1e-6)
    # agreement of a second labelling on the pairs the first one decided, a tie counting half
    ua, ub = torch.rand(n, generator=torch.Generator().manual_seed(1)), torch.rand(n)
    first = annotators.label(ua, ub, torch.Generator().manual_seed(2))
    second = annotators.label(ua, ub, torch.Generator().manual_seed(3))
    kept = first != 0.5
    agreement = ((first == second).float() + 0.5 * (second == 0.5).float())[kept].mean().item()
    assert agreement == pytest.approx(annotators.consistency_ceiling(ua[kept], ub[kept]), abs=0.01)
    with pytest.raises(ValueError, match="tie_margin"):
        judges.AnnotatorConfig(tie_margin=-0.1)


def test_annotator_utility_prefers_the_right_picture(drawn):
    images, scenes = drawn
    right = [s.caption for s in scenes]
    wrong = [world.caption(s.color, _next(world.SHAPES, s.shape), s.position) for s in scenes]
    u_right, u_wrong = judges.annotator_utility(images, right), judges.annotator_utility(images, wrong)
    assert u_right.min() >= 0 and u_right.max() <= 1
    assert (u_right > u_wrong).float().mean() >= 0.97
    assert (u_right - u_wrong).mean() > 0.25


def test_realism_guards(drawn):
    images, _ = drawn
    half = len(images) // 2
    same = judges.realism_ratios(images[:half], images[half:])
    assert same["foreground_area"] == pytest.approx(1.0, abs=0.15)
    assert same["high_frequency"] == pytest.approx(1.0, abs=0.15)
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    ratios = judges.realism_ratios(blurred, images)
    assert ratios["high_frequency"] < 0.5
    assert ratios["foreground_area"] == pytest.approx(1.0, abs=0.1)  # blur spreads colour, moves no contour
    painted = images.clone()
    painted[:, :, 4:28, 4:28] = torch.tensor(world.COLORS["red"]).view(1, 3, 1, 1)
    assert judges.realism_ratios(painted, images)["foreground_area"] > 3.0


def test_foreground_area_is_the_area_inside_the_half_contrast_contour():
    background, square = torch.tensor([0.5, 0.5, 0.4]), torch.tensor(world.COLORS["red"])
    images = background.view(1, 3, 1, 1).repeat(3, 1, 32, 32)
    images[0, :, 8:18, 10:20] = square.view(3, 1, 1)  # 100 pixels
    images[1] = F.avg_pool2d(images[:1], 3, stride=1, padding=1, count_include_pad=False)[0]
    area = judges.foreground_area(images) * 32 * 32
    assert area[0].item() == pytest.approx(100)
    assert area[1].item() == pytest.approx(100, abs=8)  # the corners round off; the rim does not count
    assert area[2].item() == 0  # a blank picture has no foreground
    ring = torch.zeros(32, 32)
    ring[6:20, 8:22] = 1
    ring[8:18, 10:20] = 0
    haloed = images[:1] + 0.35 * ring * (square - background).view(1, 3, 1, 1)  # a faint halo two pixels wide ...
    assert (judges.foreground_area(haloed) * 32 * 32).item() == pytest.approx(100)  # ... is no area


def test_clip_training_lowers_the_contrastive_loss_and_reward_is_differentiable(tmp_path):
    from rlkit.shapes.clip import ClipTrainConfig, ShapesClipModel, contrastive_loss, train_clip

    torch.manual_seed(0)
    scenes = world.sample_scenes(64, np.random.default_rng(3))
    images, captions = world.draw_batch(scenes, seed=3), [s.caption for s in scenes]
    before = contrastive_loss(ShapesClipModel(), images, captions).item()
    model = train_clip(ClipTrainConfig(steps=40, batch_size=64, lr=3e-3, max_minutes=2.0), log=lambda _: None)
    with torch.no_grad():
        after = contrastive_loss(model, images, captions).item()
    assert after < before - 0.3
    model.save_pretrained(str(tmp_path / "clip"))
    reward = rewards.build("shapes-clip", path=str(tmp_path / "clip"))
    assert reward.space == "pixel" and reward.differentiable
    pixels = images[:4].clone().requires_grad_(True)
    out = reward(RewardInput(prompts=captions[:4], images=pixels))
    assert out.scores.shape == (4,) and (out.scores.abs() <= 1.0 + 1e-5).all()
    out.scores.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert torch.allclose(out.scores, model.similarity(images[:4], captions[:4]), atol=1e-5)


def test_clip_reward_missing_folder_is_a_clear_error(tmp_path):
    from rlkit.models.sd3 import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="Shapes CLIP reward"):
        judges.ShapesClipReward(path=str(tmp_path / "nothing"))
