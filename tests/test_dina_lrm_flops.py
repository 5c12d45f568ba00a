"""Meta-device parameter and FLOP counts of DiNa-LRM (tiny shapes; SD3.5-M runs in the benchmarks)."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from rewards.base import TextConditioning
from rewards.dina_lrm import DiNaLRM, DiNaLRMConfig
from rewards.dina_lrm.flops import CLIP_TOKENS, dina_lrm_cost

TINY = dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
            pos_embed_max_size=16, dual_attention_layers=(0, 1), qk_norm="rms_norm")
CONFIG = DiNaLRMConfig(num_transformer_layers=3, visual_head_idx=(1, 2, 3), text_head_idx=(2, 3), lora_r=4,
                       lora_alpha=8, num_attn_heads=4, max_sequence_length=8)
LATENT_SCALE = 2  # pixels per latent cell in this test
RESOLUTION = 16


def test_counts_match_a_real_model_on_cpu():
    from diffusers import SD3Transformer2DModel

    report = dina_lrm_cost(CONFIG, TINY, resolution=RESOLUTION, batch_size=2, vae_scale=LATENT_SCALE)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**TINY).requires_grad_(False)
    assert report.generator_params == sum(p.numel() for p in transformer.parameters())
    side = RESOLUTION // LATENT_SCALE
    latents = torch.randn(2, 4, side, side, requires_grad=True)
    text = TextConditioning(torch.randn(2, CLIP_TOKENS + CONFIG.max_sequence_length, 32), torch.randn(2, 32))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:  # the generator as it is, without the reward's LoRA on its blocks
        transformer(hidden_states=latents, encoder_hidden_states=text.encoder_hidden_states,
                    pooled_projections=text.pooled_projections, timestep=torch.full((2,), 400.0))
    assert report.generator_forward_flops == counter.get_total_flops() > 0
    model = DiNaLRM.build(CONFIG, transformer)
    model.set_trainable(lora=False, head=False)
    lora_modules = [m for n, m in transformer.named_modules() if hasattr(m, "lora_A")]
    expected_lora = sum(CONFIG.lora_r * (m.in_features + m.out_features) for m in lora_modules)
    assert report.reward_lora_params == expected_lora
    assert report.reward_head_params == sum(p.numel() for p in model.reward_head.parameters())
    assert report.shared_added_params == expected_lora + report.reward_head_params

    # CPU's fused attention kernel has no FLOP formula; the math kernel is what meta tensors count
    with sdpa_kernel(SDPBackend.MATH), counter:
        score = model.score(latents, torch.full((2,), 0.4), text)
    assert report.reward_forward_flops == counter.get_total_flops() > 0
    with sdpa_kernel(SDPBackend.MATH), counter:
        torch.autograd.grad(score.sum(), latents)
    assert report.reward_backward_flops == counter.get_total_flops() > 0


def test_reward_is_cheaper_than_the_generator_and_scales_with_batch():
    one = dina_lrm_cost(CONFIG, TINY, resolution=RESOLUTION, batch_size=1, vae_scale=LATENT_SCALE)
    two = dina_lrm_cost(CONFIG, TINY, resolution=RESOLUTION, batch_size=2, vae_scale=LATENT_SCALE)
    assert two.reward_forward_flops == 2 * one.reward_forward_flops
    assert two.generator_forward_flops == 2 * one.generator_forward_flops
    big = dina_lrm_cost(CONFIG, TINY, resolution=2 * RESOLUTION, batch_size=1, vae_scale=LATENT_SCALE)
    assert big.generator_forward_flops > 3 * one.generator_forward_flops  # 4x the image tokens
    deep = DiNaLRMConfig(**{**CONFIG.__dict__, "num_transformer_layers": 4, "visual_head_idx": (1, 2, 4),
                            "text_head_idx": (2, 3)})
    assert dina_lrm_cost(deep, TINY, resolution=RESOLUTION, vae_scale=LATENT_SCALE).reward_forward_flops > \
        one.reward_forward_flops
    assert one.reward_backbone_params < one.generator_params


def test_text_tap_on_a_block_without_text_output_is_refused():
    import pytest

    bad = DiNaLRMConfig(**{**CONFIG.__dict__, "num_transformer_layers": 4, "text_head_idx": (2, 4)})
    with pytest.raises(ValueError, match="text_head_idx"):
        dina_lrm_cost(bad, TINY, resolution=RESOLUTION, vae_scale=LATENT_SCALE)
