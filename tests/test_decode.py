"""The pixel path: latents -> VAE -> [0, 1] images, its memory options, and one decode per batch."""

from __future__ import annotations

import torch

from rewards.base import MemoDecode
from rlkit.models.decode import DecodeConfig, latents_to_vae, make_decode


def _latents(gen, b=2, seed=0):
    return torch.randn(b, *gen.latent_shape(16), generator=torch.Generator().manual_seed(seed))


def test_decode_undoes_shift_and_scale(tiny_generator):
    vae = tiny_generator.vae
    latents = _latents(tiny_generator)
    images = make_decode(tiny_generator, memo=False)(latents)
    cfg = vae.config
    assert cfg.shift_factor != 0 and cfg.scaling_factor != 1  # the tiny VAE exercises both
    with torch.no_grad():
        ref = vae.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample
    torch.testing.assert_close(images, (ref / 2 + 0.5).clamp(0, 1))
    torch.testing.assert_close(latents_to_vae(latents, vae), latents / cfg.scaling_factor + cfg.shift_factor)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1


def test_memoised_decode_runs_once_per_batch(tiny_generator):
    decode = make_decode(tiny_generator)
    assert isinstance(decode, MemoDecode)
    latents = _latents(tiny_generator)
    first = decode(latents)
    assert decode(latents) is first and decode.calls == 1
    decode(_latents(tiny_generator, seed=1))
    assert decode.calls == 2


def _grad(gen, config):
    latents = _latents(gen, seed=3).requires_grad_()
    images = make_decode(gen, config, memo=False)(latents)
    (images * torch.linspace(0, 1, images.numel()).view_as(images)).sum().backward()
    return images.detach(), latents.grad


def test_memory_options_keep_values_and_gradients(tiny_generator):
    images, grad = _grad(tiny_generator, DecodeConfig())
    assert grad.abs().sum() > 0
    for config in (DecodeConfig(gradient_checkpointing=True), DecodeConfig(slicing=True),
                   DecodeConfig(gradient_checkpointing=True, slicing=True)):
        other_images, other_grad = _grad(tiny_generator, config)
        torch.testing.assert_close(other_images, images, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other_grad, grad, atol=1e-5, rtol=1e-4)
    assert tiny_generator.vae.use_slicing  # the last config left slicing on
    make_decode(tiny_generator, DecodeConfig())
    assert not tiny_generator.vae.use_slicing


def test_vae_decode_cost_on_meta():
    from rewards.cost import vae_decode_part

    small, large = vae_decode_part(512), vae_decode_part(1024)
    assert small.params == large.params == 49_545_475  # SD3.5-M VAE decoder (no post-quant conv)
    # convolutions scale with pixels (4x); the mid-block attention with pixels squared, so a little more
    assert 4.0 < large.flops / small.flops < 4.5
    assert vae_decode_part(512, batch_size=2).flops == 2 * small.flops
    # first conv_in (16 -> 512, 3x3) on 64 x 64 latents, counted by hand: 2 * 64^2 * 512 * 16 * 9
    assert small.flops > 2 * 64 * 64 * 512 * 16 * 9


def test_decode_if_needed_follows_the_reward_spaces(tiny_generator):
    import rewards
    from rlkit.models.decode import decode_if_needed

    latent = rewards.build("latent-direction")
    assert decode_if_needed(tiny_generator, [latent]) is None

    class PixelReward(rewards.Reward):
        space = "pixel"

    decode = decode_if_needed(tiny_generator, [latent, PixelReward()])
    assert isinstance(decode, MemoDecode) and decode.calls == 0
