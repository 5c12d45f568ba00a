"""Pretraining pieces of the Shapes generator: schedule, rectified-flow loss, CFG sampler."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace

import pytest
import torch

from rlkit.shapes import pretrain


def test_budget_warms_up_then_anneals_to_zero_by_steps():
    budget = pretrain.Budget(steps=100, max_minutes=60.0, warmup=0.1)
    factors = [budget.lr_factor(s) for s in (0, 5, 10, 55, 99, 100)]
    assert factors[0] == pytest.approx(0.01) and factors[1] == pytest.approx(0.5, abs=1e-3)
    assert factors[2] == pytest.approx(1.0, abs=1e-3) and factors[3] == pytest.approx(0.5, abs=1e-2)
    assert factors[5] == pytest.approx(0.0, abs=1e-9) and factors[4] < 0.01
    assert not budget.done(50) and budget.done(99)


def test_budget_stops_by_the_clock():
    budget = pretrain.Budget(steps=10**9, max_minutes=1e-4)
    time.sleep(0.01)
    assert budget.done(0) and budget.lr_factor(0) == pytest.approx(0.0, abs=1e-9)


def test_budget_warns_only_when_the_clock_ends_the_run():
    said = []
    by_steps = pretrain.Budget(steps=5, max_minutes=60.0)
    assert [by_steps.stop(s, "vae", said.append) for s in range(5)] == [False] * 4 + [True] and said == []
    by_clock = pretrain.Budget(steps=600, max_minutes=1e-4)
    time.sleep(0.01)
    assert by_clock.stop(419, "vae", said.append)
    assert len(said) == 1 and "vae" in said[0] and "420 of 600 steps" in said[0] and "minute cap" in said[0]


def test_vae_training_cut_by_its_minute_cap_says_so(tiny_generator):
    said = []
    vae = tiny_generator.pipeline.vae.requires_grad_(True)
    stats = pretrain.train_vae(vae, pretrain.VAETrainConfig(steps=50, batch_size=2, max_minutes=1e-6), said.append)
    assert stats["vae_steps"] == 1
    assert any("vae: stopped by its" in line and "1 of 50 steps" in line for line in said)


def test_rectified_flow_loss_matches_the_definition(tiny_generator):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    text = tiny_generator.encode_prompts(["a red circle at the top", "a blue square at the left", ""])
    with torch.no_grad():
        loss = pretrain.rectified_flow_loss(tiny_generator, x0, text, sigmas, noise)
        s = sigmas.view(-1, 1, 1, 1)
        v = tiny_generator.velocity((1 - s) * x0 + s * noise, sigmas, text)
        expected = ((v - (noise - x0)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() > 0


def test_sampler_guidance_per_prompt_equals_scalar_guidance(tiny_generator):
    prompts = ["a red circle at the top", "a blue square at the left"]
    per_item = pretrain.sample_latents(tiny_generator, prompts, torch.Generator().manual_seed(1), 3,
                                       torch.tensor([1.0, 4.0]))
    ones = pretrain.sample_latents(tiny_generator, prompts, torch.Generator().manual_seed(1), 3, 1.0)
    fours = pretrain.sample_latents(tiny_generator, prompts, torch.Generator().manual_seed(1), 3, 4.0)
    assert per_item.shape == (2, 4, 16, 16)
    assert torch.allclose(per_item[0], ones[0], atol=1e-5) and torch.allclose(per_item[1], fours[1], atol=1e-5)
    assert not torch.allclose(ones[1], fours[1], atol=1e-3)


def test_position_noise_swaps_the_given_share_for_the_same_shape_at_another_position():
    from rlkit.shapes import world

    prompts = [world.caption("red", "circle", "top"), world.caption("blue", "cross", "center"), ""]
    table, alternatives = pretrain.position_alternatives(prompts)
    assert table[:3] == prompts and len(table) == 3 + 2 * 8 and alternatives.shape == (3, 8)
    assert (alternatives[2] == -1).all()
    assert not any(world.is_heldout(world.parse_caption(t)) for t in table if t)  # noise never names a held-out pair
    for i in range(2):
        scene = world.parse_caption(prompts[i])
        others = [world.parse_caption(table[j]) for j in alternatives[i].tolist()]
        assert {(o.color, o.shape) for o in others} == {(scene.color, scene.shape)}
        assert {o.position for o in others} == set(world.POSITIONS) - {scene.position}

    ids = torch.tensor([0, 1, 2] * 20000)
    noisy = pretrain.noisy_positions(ids, alternatives, 0.4, torch.Generator().manual_seed(0))
    swapped = noisy != ids
    assert not swapped[ids == 2].any()  # the empty caption (CFG's unconditional) has no position to swap
    assert swapped[ids != 2].float().mean().item() == pytest.approx(0.4, abs=0.01)
    counts = torch.bincount(noisy[ids == 0][swapped[ids == 0]], minlength=len(table))[alternatives[0]]
    assert (counts.float() / counts.sum()).sub(1 / 8).abs().max().item() < 0.02  # uniform over the eight others (5 sd)
    assert torch.equal(pretrain.noisy_positions(ids, alternatives, 0.0, torch.Generator()), ids)


@pytest.mark.parametrize("field", ["position_noise", "undersized_share"])
def test_data_noise_changes_pretraining_deterministically(tiny_sd3_dir, field):
    from rlkit.models.sd3 import SD3Generator

    def trained(share: float) -> torch.Tensor:
        torch.manual_seed(0)
        generator = SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
        config = pretrain.GeneratorTrainConfig(steps=3, batch_size=8, num_images=16, **{field: share})
        pretrain.train_generator(generator, config, log=lambda _: None)
        return generator.transformer.proj_out.weight

    clean, noisy = trained(0.0), trained(0.5)
    assert torch.equal(noisy, trained(0.5)) and not torch.allclose(clean, noisy)


def test_configs_are_validated():
    with pytest.raises(ValueError, match="caption_dropout"):
        pretrain.GeneratorTrainConfig(caption_dropout=1.0)
    with pytest.raises(ValueError, match="position_noise"):
        pretrain.GeneratorTrainConfig(position_noise=1.5)
    with pytest.raises(ValueError, match="undersized_share"):
        pretrain.GeneratorTrainConfig(undersized_share=-0.1)
    with pytest.raises(ValueError, match="batch_size"):
        pretrain.VAETrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="latent_noise"):
        pretrain.DecoderTrainConfig(latent_noise=-0.1)
    with pytest.raises(ValueError, match="hf_weight"):
        pretrain.DecoderTrainConfig(hf_weight=-1.0)


def test_decoder_refinement_trains_only_the_decoder_and_lowers_reconstruction_error(tmp_path):
    """``PretrainConfig.decoder``: the encoder (the latent space the generator and DiNa-LRM live in) is untouched."""
    import numpy as np
    from diffusers import AutoencoderKL

    from rlkit.models.tiny import build_tiny_sd3_components
    from rlkit.shapes import world

    torch.manual_seed(0)
    vae = build_tiny_sd3_components(pretrain.shapes_model_config())["vae"]
    images = world.draw_batch(world.sample_scenes(16, np.random.default_rng(3)), seed=3) * 2 - 1

    def error() -> float:
        with torch.no_grad():
            return float((vae.decode(vae.encode(images).latent_dist.mode()).sample - images).pow(2).mean())

    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    decoder_out = vae.decoder.conv_out.weight.clone()
    before = error()
    config = pretrain.DecoderTrainConfig(steps=40, batch_size=8, lr=3e-3)
    stats = pretrain.finetune_decoder(vae, config, log=lambda _: None)
    assert stats["decoder_steps"] == 40 and error() < 0.5 * before, (before, error())
    for name, value in vae.encoder.state_dict().items():
        assert torch.equal(value, encoder[name]), name
    assert not torch.equal(vae.decoder.conv_out.weight, decoder_out)
    assert not any(p.requires_grad for p in vae.parameters())
    from rlkit.runtime.checkpoint import write_folder_atomic

    saved = write_folder_atomic(tmp_path / "vae", vae.save_pretrained)
    assert not (tmp_path / "vae.tmp").exists()
    assert torch.equal(AutoencoderKL.from_pretrained(saved).decoder.conv_out.weight, vae.decoder.conv_out.weight)


def test_decoder_energy_term_brings_reconstructions_high_frequency_energy_towards_the_pictures():
    """``DecoderTrainConfig.hf_weight``: from the same start, the energy term leaves reconstructions with the
    pictures' high-frequency energy where MSE alone leaves them blurred."""
    import copy

    import numpy as np

    from rlkit.models.tiny import build_tiny_sd3_components
    from rlkit.shapes import world
    from rlkit.shapes.judges import high_frequency_energy

    torch.manual_seed(0)
    start = build_tiny_sd3_components(pretrain.shapes_model_config())["vae"]
    images = world.draw_batch(world.sample_scenes(32, np.random.default_rng(3)), seed=3)

    def log_ratio(hf_weight: float) -> float:
        vae = copy.deepcopy(start)
        pretrain.finetune_decoder(vae, pretrain.DecoderTrainConfig(steps=60, batch_size=8, lr=3e-3,
                                                                   hf_weight=hf_weight), log=lambda _: None)
        with torch.no_grad():
            decoded = vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample / 2 + 0.5
        return float(high_frequency_energy(decoded).mean().log() - high_frequency_energy(images).mean().log())

    plain, matched = log_ratio(0.0), log_ratio(1.0)
    assert plain < -0.5 and abs(matched) < 0.5 * abs(plain), (plain, matched)


def test_shapes_generator_position_grid_tells_neighbouring_patches_apart():
    """The sin-cos grid spans the latent's own patches; the default grid (twice the latent side, in patches)
    squeezes neighbours into near copies of one embedding, which left the generator unable to place strokes."""
    from dataclasses import replace

    from rlkit.models.tiny import build_tiny_sd3_components

    cfg = pretrain.shapes_model_config()
    n = cfg.sample_size // cfg.patch_size

    def neighbour_distance(config) -> float:
        embed = build_tiny_sd3_components(config)["transformer"].pos_embed
        grid = embed.cropped_pos_embed(cfg.sample_size, cfg.sample_size)[0].view(n, n, -1)
        return float((grid[:, 1:] - grid[:, :-1]).norm(dim=-1).mean())

    ours, wide = neighbour_distance(cfg), neighbour_distance(replace(cfg, pos_embed_max_size=None))
    assert ours > 3 * wide, (ours, wide)  # the default grid is 4x as wide here
    vae = build_tiny_sd3_components(cfg)["vae"]
    assert vae.encoder.down_blocks[0].resnets[0].norm1.num_groups == cfg.vae_norm_num_groups == 8


def test_generator_pretraining_killed_midway_resumes_to_the_same_weights(tiny_sd3_dir, tmp_path, monkeypatch):
    from rlkit.models.sd3 import SD3Generator

    config = pretrain.GeneratorTrainConfig(steps=6, batch_size=4, num_images=16, max_minutes=60.0)

    def fresh():
        torch.manual_seed(0)
        return SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=16)

    whole = fresh()
    pretrain.train_generator(whole, config, log=lambda _: None)

    real_loss, calls = pretrain.rectified_flow_loss, []

    def dies_on_the_fourth_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the build is killed during step 3; the checkpoint holds steps 0-1
        return real_loss(*args, **kwargs)

    checkpoint = tmp_path / "generator.pt"
    killed = fresh()
    monkeypatch.setattr(pretrain, "rectified_flow_loss", dies_on_the_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train_generator(killed, config, log=lambda _: None, checkpoint=checkpoint, checkpoint_every=2)
    monkeypatch.setattr(pretrain, "rectified_flow_loss", real_loss)
    assert torch.load(checkpoint, weights_only=False)["step"] == 2
    messages = []
    resumed = fresh()
    stats = pretrain.train_generator(resumed, config, log=messages.append, checkpoint=checkpoint, checkpoint_every=2)
    assert stats["generator_steps"] == 6 and "resuming from step 2" in messages[0]
    assert 0 < stats["generator_seconds_per_step"] < 60  # counts the steps before the kill, and their time
    for (name, a), b in zip(whole.transformer.state_dict().items(), resumed.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(fresh().transformer.proj_out.weight, resumed.transformer.proj_out.weight)


def test_pretraining_killed_in_a_decoder_phase_resumes_after_the_work_it_finished(tmp_path, monkeypatch):
    """A build killed in the second decoder phase keeps its VAE, its generator and its first decoder phase, and
    ends with the weights and stats of a build that was never stopped."""
    config = pretrain.PretrainConfig(vae=pretrain.VAETrainConfig(steps=3, batch_size=8),
                                     generator=pretrain.GeneratorTrainConfig(steps=3, batch_size=8, num_images=32),
                                     decoder=(pretrain.DecoderTrainConfig(steps=2, batch_size=8),
                                              pretrain.DecoderTrainConfig(steps=2, batch_size=8, hf_weight=0.03)))
    whole, whole_stats = pretrain.pretrain(config, tmp_path / "whole", lambda _: None)

    real_phase = pretrain.finetune_decoder

    def dies_in_the_second_phase(vae, phase, log=print):
        if phase.hf_weight:
            raise KeyboardInterrupt
        return real_phase(vae, phase, log)

    monkeypatch.setattr(pretrain, "finetune_decoder", dies_in_the_second_phase)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(config, tmp_path / "killed", lambda _: None)
    monkeypatch.setattr(pretrain, "finetune_decoder", real_phase)
    # what it left is not resumed by a run of other settings (its finished legs are not theirs)
    shutil.copytree(tmp_path / "killed_pretrain", tmp_path / "other_pretrain")
    messages: list[str] = []
    _, other = pretrain.pretrain(replace(config, vae=replace(config.vae, steps=2)), tmp_path / "other",
                                 messages.append)
    assert "holds the work of other settings" in messages[0] and not any("reusing" in m for m in messages)
    assert other["vae_steps"] == 2
    messages = []
    resumed, stats = pretrain.pretrain(config, tmp_path / "killed", messages.append)
    assert messages[0].startswith("VAE: reusing") and messages[1].startswith("generator: reusing the leg finished 3")
    assert any(m.startswith("decoder: reusing phase 0") for m in messages)
    assert not any(m.startswith("decoder: reusing phase 1") for m in messages)
    assert stats["decoder_steps"] == whole_stats["decoder_steps"] == 4 and stats["vae_mse"] == whole_stats["vae_mse"]
    for part in ("transformer", "vae"):
        expected = getattr(whole.pipeline, part).state_dict()
        for name, value in getattr(resumed.pipeline, part).state_dict().items():
            assert torch.equal(value, expected[name]), (part, name)
    assert not (tmp_path / "killed_pretrain").exists()
    for part in ("transformer", "vae"):  # the same folders: no path of the resumed run's work folder in them
        assert (tmp_path / "killed" / part / "config.json").read_text() == \
            (tmp_path / "whole" / part / "config.json").read_text()


def test_a_continuation_leg_equals_continuing_the_saved_generator(tmp_path):
    """``PretrainConfig.continuation``: one build trains the generator, then each leg on its own data and schedule,
    exactly as :func:`pretrain.continue_pretraining` of the saved first leg would."""
    from dataclasses import replace

    first = pretrain.PretrainConfig(vae=pretrain.VAETrainConfig(steps=4, batch_size=8),
                                    generator=pretrain.GeneratorTrainConfig(steps=4, batch_size=8, num_images=32))
    leg = pretrain.GeneratorTrainConfig(steps=3, batch_size=8, num_images=32, lr=1e-3, seed=1, undersized_share=0.5)

    def quiet(_: str) -> None:
        pass

    whole, stats = pretrain.pretrain(replace(first, continuation=(leg,)), tmp_path / "whole", quiet)
    assert stats["generator_steps"] == 7 and not (tmp_path / "whole_pretrain").exists()
    pretrain.pretrain(first, tmp_path / "first", quiet)
    continued, _ = pretrain.continue_pretraining(tmp_path / "first", leg, log=quiet)
    for (name, a), b in zip(whole.transformer.state_dict().items(), continued.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    unchanged = pretrain.load_generator(tmp_path / "first").transformer.proj_out.weight
    assert not torch.equal(unchanged, whole.transformer.proj_out.weight)
