"""The Shapes preference set: drawn pairs (one attribute wrong) and their source syntax."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

import numpy as np
import pytest
import torch

from rlkit.shapes import preferences, world


def test_a_drawn_loser_gets_exactly_one_attribute_wrong_at_the_configured_rates():
    rng = np.random.default_rng(0)
    scenes = world.sample_scenes(4000, rng)
    changed = Counter()
    for scene in scenes:
        other = preferences._one_attribute_off(scene, rng)
        diff = [k for k, v in asdict(scene).items() if asdict(other)[k] != v]
        assert len(diff) == 1
        changed[diff[0]] += 1
    for attribute, share in preferences.DRAWN_CHANGES.items():
        assert changed[attribute] / len(scenes) == pytest.approx(share, abs=0.03)


@pytest.mark.parametrize("source, expected", [("shapes:drawn:4096", (4096, 0)), ("shapes:drawn:8:3", (8, 3))])
def test_drawn_source_syntax(source, expected):
    assert preferences.parse_drawn_source(source) == expected


@pytest.mark.parametrize("source", ["shapes:drawn", "shapes:drawn:0", "shapes:drawn:x", "shapes:drawn:4:1:2"])
def test_drawn_source_errors_name_the_source_and_the_syntax(source):
    with pytest.raises(ValueError, match=r"shapes:drawn:<pairs>\[:<seed>\]"):
        preferences.parse_drawn_source(source)


def test_drawn_pairs_are_seeded_and_the_annotators_prefer_the_right_picture(tiny_generator):
    from rlkit.shapes.judges import AnnotatorConfig

    exact = AnnotatorConfig(noise_std=0.0, tie_margin=0.05)
    pairs = preferences.drawn_pairs(tiny_generator, 12, seed=1, annotators=exact, batch_size=8)
    again = preferences.drawn_pairs(tiny_generator, 12, seed=1, annotators=exact, batch_size=8)
    other = preferences.drawn_pairs(tiny_generator, 12, seed=2, annotators=exact, batch_size=8)
    assert len(pairs) == 12 and [p.prompt for p in pairs] == [p.prompt for p in again]
    assert all((a.chosen == b.chosen).all() for a, b in zip(pairs, again))
    assert any(not (a.chosen == b.chosen).all() for a, b in zip(pairs, other))
    assert not set(p.prompt for p in pairs) & set(world.heldout_prompts())  # training scenes only
    # noise-free annotators prefer the picture of the prompt: chosen is its encoding, rejected the wrong one's
    for pair in pairs[:4]:
        picture_seed, index = pair.meta["picture"]
        scenes = [world.parse_caption(pair.prompt)] * (index + 1)
        wrong = [world.parse_caption(pair.meta["wrong"])] * (index + 1)
        right_z = tiny_generator.encode(world.draw_batch(scenes, picture_seed)[index:])[0]
        wrong_z = tiny_generator.encode(world.draw_batch(wrong, picture_seed)[index:])[0]
        assert torch.allclose(pair.chosen, right_z, atol=1e-5) and torch.allclose(pair.rejected, wrong_z, atol=1e-5)
