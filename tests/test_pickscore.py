"""PickScore adapter on a tiny random CLIP saved locally (same from_pretrained path as the hub ids)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards.base import MemoDecode, RewardInput
from rlkit.models.sd3 import WeightsNotFoundError

PROMPTS = ["a red circle", "blue square on the left", "a red circle"]


@pytest.fixture(scope="module")
def tiny_pickscore_dir(tmp_path_factory):
    from rewards.tiny import save_tiny_pickscore

    return save_tiny_pickscore(tmp_path_factory.mktemp("pickscore") / "clip")


@pytest.fixture(scope="module")
def reward(tiny_pickscore_dir):
    return rewards.build("pickscore", model=str(tiny_pickscore_dir), processor=str(tiny_pickscore_dir))


def _quantised(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (upsampled 6x6 noise, like natural images rather than per-pixel noise) whose
    values are exact multiples of 1/255, so the PIL path sees the same pixels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 6, 6, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (smooth * 255).round() / 255


def _pil(images: torch.Tensor) -> list[Image.Image]:
    u8 = (images * 255).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in u8]


def _processor_scores(reward, images, prompts):
    """Independent reference: transformers' processor + CLIPModel.forward (logits_per_image diagonal)."""
    from transformers import CLIPProcessor

    proc = CLIPProcessor.from_pretrained(reward.config.processor)
    inputs = proc(text=prompts, images=_pil(images), return_tensors="pt", padding="max_length", max_length=77,
                  truncation=True)
    with torch.no_grad():
        return reward.model(**inputs).logits_per_image.diag(), inputs["pixel_values"]


def test_scores_shape_and_equal_clip_logits(reward):
    images = _quantised(3, 28, 28)  # native size: the processor only rescales and normalises
    out = reward(RewardInput(prompts=PROMPTS, images=images))
    ref, _ = _processor_scores(reward, images, PROMPTS)
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.extras["raw"], out.scores)


@pytest.mark.parametrize("size", [(40, 56), (56, 56), (64, 30)])
def test_tensor_preprocessing_matches_processor(reward, size):
    images = _quantised(2, *size, seed=1)
    _, ref_pixels = _processor_scores(reward, images, PROMPTS[:2])
    mine = reward.preprocess(images)
    assert mine.shape == ref_pixels.shape
    diff = (mine - ref_pixels).abs()
    # PIL resizes 8-bit images in fixed point: differences of a few 1/255 steps (/ std ~0.27)
    assert diff.mean() < 0.01 and diff.max() < 0.03
    ref_scores, _ = _processor_scores(reward, images, PROMPTS[:2])
    torch.testing.assert_close(reward(RewardInput(prompts=PROMPTS[:2], images=images)).scores, ref_scores,
                               atol=0.05, rtol=0.0)


@pytest.mark.parametrize("size", [(512, 512), (512, 768)])
def test_clip_preprocess_matches_the_224_processor(size):
    """PickScore's real settings (laion ViT-H/14 processor: shortest edge 224, crop 224) on generator-sized images."""
    from transformers import CLIPImageProcessor

    from rewards.pixels import clip_preprocess

    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    images = _quantised(1, *size, seed=4)
    ref = processor(images=_pil(images), return_tensors="pt")["pixel_values"]
    diff = (clip_preprocess(images, 224, (224, 224)) - ref).abs()
    assert ref.shape == (1, 3, 224, 224) and diff.mean() < 0.01 and diff.max() < 0.03


def test_text_embeddings_cached_per_prompt(reward):
    reward._text_cache.clear()
    first = reward.text_embeddings(PROMPTS)
    assert sorted(reward._text_cache) == sorted(set(PROMPTS))
    cached = dict(reward._text_cache)
    again = reward.text_embeddings(list(reversed(PROMPTS)))
    assert all(reward._text_cache[p] is cached[p] for p in cached)
    torch.testing.assert_close(again, first.flip(0))
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(3))


def test_affine_normalisation(tiny_pickscore_dir, reward):
    scaled = rewards.build("pickscore", model=str(tiny_pickscore_dir), processor=str(tiny_pickscore_dir),
                           normalize="affine", shift=1.0, scale=26.0)
    images = _quantised(2, 28, 28, seed=2)
    raw = reward(RewardInput(prompts=PROMPTS[:2], images=images)).scores
    out = scaled(RewardInput(prompts=PROMPTS[:2], images=images))
    torch.testing.assert_close(out.scores, (raw + 1.0) / 26.0)
    torch.testing.assert_close(out.extras["raw"], raw)


def test_no_graph_unless_asked(reward):
    images = _quantised(2, 28, 28)
    assert not reward(RewardInput(prompts=PROMPTS[:2], images=images)).scores.requires_grad
    with torch.no_grad():
        assert not reward(RewardInput(prompts=PROMPTS[:2], images=images.requires_grad_())).scores.requires_grad


def test_gradients_reach_latents_through_decode(reward, tiny_generator):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *tiny_generator.latent_shape(16), generator=g).requires_grad_()
    decode = MemoDecode(tiny_generator.decode)
    out = reward(RewardInput(prompts=PROMPTS[:2], latents=latents, decode=decode))
    out.scores.sum().backward()
    assert decode.calls == 1
    assert latents.grad is not None and torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0
    # the attached generator's VAE decodes when the batch carries no decoder
    reward.attach_generator(tiny_generator)
    try:
        again = reward(RewardInput(prompts=PROMPTS[:2], latents=latents.detach()))
    finally:
        reward.attach_generator(None)
    torch.testing.assert_close(again.scores, out.scores.detach())


def test_missing_weights_name_the_source(tiny_pickscore_dir, tmp_path):
    with pytest.raises(WeightsNotFoundError) as err:
        rewards.build("pickscore", model=str(tmp_path / "nowhere"), processor=str(tiny_pickscore_dir))
    msg = str(err.value)
    assert "there is no folder" in msg and msg.count("nowhere") == 2 and err.value.__suppress_context__
    with pytest.raises(WeightsNotFoundError, match="nobody/no-such-clip"):
        rewards.build("pickscore", model=str(tiny_pickscore_dir), processor="nobody/no-such-clip")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError, match="exists but is not a complete"):
        rewards.build("pickscore", model=str(empty), processor=str(tiny_pickscore_dir))


def test_config_errors_name_the_field(tiny_pickscore_dir):
    with pytest.raises(ValueError, match="normalize"):
        rewards.build("pickscore", model=str(tiny_pickscore_dir), processor=str(tiny_pickscore_dir), normalize="z")
    with pytest.raises(TypeError, match="nonsense"):
        rewards.build("pickscore", nonsense=1)


def test_meta_cost_matches_hand_count():
    from rewards.pickscore import PickScoreReward

    cost = PickScoreReward.meta_cost(512)
    vision, text = cost.parts["clip_vision"], cost.parts["clip_text"]
    assert 630e6 < vision.params < 635e6 and 353e6 < text.params < 356e6  # ViT-H/14: 632 M + 354 M
    # hand count of the vision tower: 257 tokens, width 1280, MLP 5120, 32 layers, patch conv, projection
    t, d, ff, layers = 257, 1280, 5120, 32
    per_layer = 2 * t * (4 * d * d + 2 * d * ff) + 2 * 2 * t * t * d
    hand = layers * per_layer + 2 * 256 * (3 * 14 * 14) * d + 2 * d * 1024
    assert abs(vision.flops - hand) / hand < 0.01
    assert cost.parts["vae_decode"].flops > 2e12 and cost.flops == sum(p.flops for p in cost.parts.values())
