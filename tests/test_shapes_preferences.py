"""The Shapes preference set: drawn pairs (one attribute wrong), generated pairs (every within-prompt pair of
the base generator's samples) and their source syntax."""

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


def test_a_training_pairs_loser_is_never_a_held_out_combination():
    """Held-out combinations reach no training stage, not even as the wrong picture of a drawn pair (a quarter
    of the training losers had been one); an evaluation pair's loser may be anything."""
    rng = np.random.default_rng(1)
    losers = [preferences._one_attribute_off(s, rng) for s in world.sample_scenes(4000, rng, "train")]
    assert not any(world.is_heldout(o) for o in losers)
    held_out = [preferences._one_attribute_off(s, rng, "heldout") for s in world.sample_scenes(400, rng, "heldout")]
    assert any(world.is_heldout(o) for o in held_out)  # e.g. another position: the same held-out combination


@pytest.mark.parametrize("source, expected", [
    ("shapes:drawn:4096", ("shapes:drawn", 4096, 0)), ("shapes:drawn:8:3", ("shapes:drawn", 8, 3)),
    ("shapes:generated:8192:2", ("shapes:generated", 8192, 2)),
])
def test_shapes_source_syntax(source, expected):
    assert preferences.parse_shapes_source(source) == expected


@pytest.mark.parametrize("source, syntax", [
    ("shapes:drawn", r"shapes:drawn:<pairs>\[:<seed>\]"), ("shapes:drawn:0", r"shapes:drawn:<pairs>\[:<seed>\]"),
    ("shapes:drawn:x", r"shapes:drawn:<pairs>\[:<seed>\]"), ("shapes:drawn:4:1:2", r"shapes:drawn:<pairs>\[:<seed>\]"),
    ("shapes:generated:-1", r"shapes:generated:<samples>\[:<seed>\]"),
    ("shapes:sampled:4", r"one of shapes:drawn:<pairs>\[:<seed>\], shapes:generated:<samples>"),
])
def test_shapes_source_errors_name_the_source_and_the_syntax(source, syntax):
    with pytest.raises(ValueError, match=rf"{source!r}: expected {syntax}"):
        preferences.parse_shapes_source(source)


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


def test_generated_pairs_label_every_decided_within_prompt_pair_of_the_generators_samples():
    from rlkit.shapes.judges import AnnotatorConfig, annotator_utility
    from rlkit.shapes.pretrain import load_generator

    generator = load_generator()  # the shipped one: its samples differ in how well they draw the shape
    exact = AnnotatorConfig(noise_std=0.0, tie_margin=0.05)
    pairs = preferences.generated_pairs(generator, 12, seed=3, annotators=exact, group_size=6, num_steps=4)
    again = preferences.generated_pairs(generator, 12, seed=3, annotators=exact, group_size=6, num_steps=4)
    assert 0 < len(pairs) <= 2 * 15  # two groups of six samples: at most C(6, 2) pairs each
    assert [p.meta["samples"] for p in pairs] == [p.meta["samples"] for p in again]
    assert all(torch.equal(a.chosen, b.chosen) for a, b in zip(pairs, again))
    prompts = {p.prompt for p in pairs}
    assert prompts <= set(world.train_prompts()) and len(prompts) <= 2
    # one latent per sample (``meta["samples"]``: chosen, rejected), the same in every pair it takes part in
    latent_of: dict[int, torch.Tensor] = {}
    for pair in pairs:
        for index, latent in zip(pair.meta["samples"], (pair.chosen, pair.rejected)):
            assert torch.equal(latent_of.setdefault(index, latent), latent)
    assert len(latent_of) < 2 * len(pairs)  # samples recur across pairs
    # noise-free annotators: the chosen side's utility beats the rejected side's by more than the tie margin
    chosen = torch.stack([p.chosen for p in pairs])
    rejected = torch.stack([p.rejected for p in pairs])
    names = [p.prompt for p in pairs]
    margin = annotator_utility(generator.decode(chosen), names) - annotator_utility(generator.decode(rejected), names)
    assert (margin > 0.05).all()


def test_generated_pairs_cache_reuses_one_sampling_and_only_for_the_same_weights(tmp_path, monkeypatch):
    from rlkit.shapes.judges import AnnotatorConfig
    from rlkit.shapes.pretrain import load_generator

    generator = load_generator()  # a random tiny generator's samples all tie; the shipped one's do not
    exact = AnnotatorConfig(noise_std=0.0, tie_margin=0.05)
    args = dict(num_samples=12, seed=3, annotators=exact, group_size=6, num_steps=4, progress=False)
    fresh = preferences.generated_pairs(generator, **args)
    stored = preferences.generated_pairs(generator, **args, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and len(fresh) > 0

    def no_sampling(*_, **__):
        raise AssertionError("sampled again although the cache holds these samples")

    monkeypatch.setattr(preferences, "sample_latents", no_sampling)
    reused = preferences.generated_pairs(generator, **args, cache_dir=tmp_path)
    for pairs in (stored, reused):
        assert [(p.prompt, p.meta, p.file, p.row) for p in pairs] == [(p.prompt, p.meta, p.file, p.row) for p in fresh]
        assert all(torch.equal(a.chosen, b.chosen) and torch.equal(a.rejected, b.rejected)
                   for a, b in zip(pairs, fresh))
    # other arguments or other generator weights are not served from the cache
    with pytest.raises(AssertionError, match="sampled again"):
        preferences.generated_pairs(generator, **{**args, "num_steps": 3}, cache_dir=tmp_path)
    with torch.no_grad():
        next(generator.transformer.parameters()).add_(1e-3)
    with pytest.raises(AssertionError, match="sampled again"):
        preferences.generated_pairs(generator, **args, cache_dir=tmp_path)


def test_reward_model_data_cache_dir_reaches_the_generated_source(tmp_path):
    from rlkit.config import PreferenceDataConfig, RewardModelConfig
    from rlkit.shapes.pretrain import load_generator
    from rlkit.trainers.reward_model import _load

    cfg = RewardModelConfig(data=PreferenceDataConfig(train="shapes:generated:12:3", cache_dir=str(tmp_path)))
    pairs = _load(cfg.data.train, cfg, "train", load_generator())
    assert pairs and [f.name for f in tmp_path.iterdir()] == ["generated_12_3.safetensors"]


def test_reward_model_training_reads_generated_pairs_sampled_before_it(tmp_path, monkeypatch):
    """The build samples the generated pairs once and trains two DiNa-LRMs on them: the trainer must find the
    samples cached from the bare generator, although its model then adds an adapter to the generator's blocks."""
    from rlkit.config import load_recipe
    from rlkit.confload import shipped_recipe
    from rlkit.shapes.build import DINA_RECIPE
    from rlkit.shapes.pretrain import load_generator
    from rlkit.trainers.reward_model import setup

    source = "shapes:generated:12:3"
    sampled = preferences.shapes_source_pairs(load_generator(), source, cache_dir=tmp_path)

    def no_sampling(*_, **__):
        raise AssertionError("sampled again although the cache holds these samples")

    monkeypatch.setattr(preferences, "sample_latents", no_sampling)
    recipe = load_recipe(shipped_recipe(DINA_RECIPE), [
        f"output_dir={tmp_path / 'run'}", f"reward_model.data.train=[{source}]", "reward_model.data.eval=null",
        f"reward_model.data.cache_dir={tmp_path}", "reward_model.batch_size=4"])
    run = setup(recipe)
    assert len(run.train_pairs) == len(sampled) > 0
    assert all(torch.equal(a.chosen, b.chosen) for a, b in zip(run.train_pairs, sampled))
