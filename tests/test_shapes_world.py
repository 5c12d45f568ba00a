"""The Shapes world's data: determinism, captions, held-out prompts never in the training streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlkit.shapes import world


def test_draw_is_a_pure_function_of_seed():
    scenes = world.all_scenes()[:16]
    a, b = world.draw_batch(scenes, seed=3), world.draw_batch(scenes, seed=3)
    c = world.draw_batch(scenes, seed=4)
    assert a.shape == (16, 3, world.IMAGE_SIZE, world.IMAGE_SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05
    assert a.min() >= 0 and a.max() <= 1


def test_drawn_shape_has_palette_colour_at_its_cell():
    scene = world.Scene("blue", "square", "bottom right")
    image = world.draw(scene, np.random.default_rng(0))
    blue = torch.tensor(world.COLORS["blue"]).view(3, 1, 1)
    close = ((torch.from_numpy(image) - blue).norm(dim=0) < 0.2).float()
    ys, xs = torch.nonzero(close, as_tuple=True)
    assert close.sum() > 40  # a square of half extent >= 4 covers >= 64 pixels, minus soft edges
    assert xs.float().mean() > 2 * world.IMAGE_SIZE / 3 and ys.float().mean() > 2 * world.IMAGE_SIZE / 3


def test_stream_is_deterministic_and_excludes_heldout():
    first = list(world.batches(world.shapes_dataset(48, seed=5), batch_size=16))
    second = list(world.batches(world.shapes_dataset(48, seed=5), batch_size=16))
    other = list(world.batches(world.shapes_dataset(48, seed=6), batch_size=16))
    assert len(first) == 3 and first[0][0].shape == (16, 3, 32, 32)
    for (ia, ca), (ib, cb) in zip(first, second):
        assert torch.equal(ia, ib) and ca == cb
    assert not torch.equal(first[0][0], other[0][0])
    heldout = set(world.heldout_prompts())
    captions = [c for _, caps in first for c in caps]
    assert not heldout & set(captions)
    assert len(set(captions)) > 20  # the stream covers many combinations
    held = [c for _, caps in world.batches(world.shapes_dataset(32, seed=5, split="heldout"), 32) for c in caps]
    assert set(held) <= heldout


def test_heldout_prompts_are_fixed_and_need_composition():
    heldout, train = world.heldout_prompts(), world.train_prompts()
    assert len(heldout) == len(world.HELDOUT_PAIRS) * len(world.POSITIONS) == 54
    assert len(train) + len(heldout) == len(world.COLORS) * len(world.SHAPES) * len(world.POSITIONS)
    assert not set(heldout) & set(train)
    assert heldout[0] == "a red triangle at the top left"
    # every colour and every shape of a held-out pair is seen in training, just not together
    seen = {world.parse_caption(p) for p in train}
    assert {s.color for s in seen} == set(world.COLORS) and {s.shape for s in seen} == set(world.SHAPES)
    assert {c for c, _ in world.HELDOUT_PAIRS} == set(world.COLORS)
    assert {s for _, s in world.HELDOUT_PAIRS} == set(world.SHAPES)
    with pytest.raises(ValueError, match="split"):
        world.sample_scenes(1, np.random.default_rng(0), "test")


def test_parse_caption_round_trip_and_errors():
    for scene in world.all_scenes():
        assert world.parse_caption(scene.caption) == scene
    with pytest.raises(ValueError, match="no shape"):
        world.parse_caption("a red thing at the top")


def test_every_caption_word_is_one_clip_token():
    from rlkit.models.tiny import _clip_tokenizer
    from rlkit.shapes.pretrain import MAX_CLIP_LENGTH, MAX_SEQUENCE_LENGTH, shapes_model_config

    cfg = shapes_model_config()
    tokenizer = _clip_tokenizer(cfg.words, cfg.max_clip_length)
    for word in world.VOCABULARY:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    longest = max(len(p.split()) for p in world.train_prompts() + world.heldout_prompts())
    assert longest + 2 <= MAX_CLIP_LENGTH and longest + 1 <= MAX_SEQUENCE_LENGTH


def test_undersized_share_draws_that_share_of_small_shapes_and_zero_draws_the_pictures_as_before():
    from rlkit.shapes.judges import foreground_area

    scenes = world.sample_scenes(300, np.random.default_rng(0))
    normal = world.draw_batch(scenes, seed=1)
    assert torch.equal(normal, world.draw_batch(scenes, seed=1, config=world.DrawConfig(undersized_share=0.0)))
    small = foreground_area(world.draw_batch(scenes, seed=1, config=world.DrawConfig(undersized_share=1.0)))
    area = foreground_area(normal)
    # radius 2.0-2.6 against 4.0-5.5 px: about a quarter of the area, on every picture
    assert 0.15 < float(small.mean() / area.mean()) < 0.35 and float((small < 0.6 * area).float().mean()) > 0.95
    mixed = foreground_area(world.draw_batch(scenes, seed=1, config=world.DrawConfig(undersized_share=0.4)))
    share = float((mixed < 0.6 * area).float().mean())
    assert 0.3 < share < 0.5, share


def test_draw_config_is_validated():
    with pytest.raises(ValueError, match="radius_range"):
        world.DrawConfig(radius_range=(5.0, 4.0))
    with pytest.raises(ValueError, match="undersized_radius_range"):
        world.DrawConfig(undersized_radius_range=(0.0, 2.0))
    with pytest.raises(ValueError, match="undersized_share"):
        world.DrawConfig(undersized_share=1.5)
    with pytest.raises(ValueError, match="cell_centers"):
        world.DrawConfig(cell_centers=(2.0, 16.0, 25.0))
