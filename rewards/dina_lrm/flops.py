"""Parameter counts and FLOPs of DiNa-LRM next to the full generator, measured on the meta device.

Nothing is allocated: the SD3 transformer (the SD3.5-M config by default) and the reward are built on
``torch.device("meta")`` and run under ``torch.utils.flop_counter.FlopCounterMode``, which counts matmuls,
convolutions and attention from their shapes (on meta tensors attention runs as the math kernel, two
batched matmuls; CPU's fused attention kernel would count as zero). The backward pass is the one ReFL runs
through a frozen reward: gradients with respect to the input latents only (no weight gradients).

Usage (a benchmark or a shell)::

    from rewards.dina_lrm.flops import dina_lrm_cost
    print(dina_lrm_cost(resolution=1024).as_dict())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from rewards.base import TextConditioning
from rewards.dina_lrm.config import DiNaLRMConfig
from rewards.dina_lrm.model import TIMESTEP_SCALE, DiNaLRM

# stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35M_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD35_VAE_SCALE = 8  # pixels per latent cell
CLIP_TOKENS = 77  # SD3 text: 77 CLIP tokens followed by the T5 tokens
EVAL_SIGMA = 0.4


@dataclass
class CostReport:
    """Counts at one resolution and batch size. FLOPs are per call (the whole batch)."""

    resolution: int
    batch_size: int
    text_tokens: int
    reward_backbone_params: int  # base weights the reward runs (embedders + first N blocks)
    reward_lora_params: int
    reward_head_params: int
    generator_params: int  # the whole transformer
    reward_forward_flops: int
    reward_backward_flops: int  # gradient w.r.t. the latents only (frozen reward, ReFL)
    generator_forward_flops: int
    generator_backward_flops: int  # gradient w.r.t. the input latents only

    @property
    def shared_added_params(self) -> int:
        """What a reward sharing the generator's blocks adds: LoRA + head."""
        return self.reward_lora_params + self.reward_head_params

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shared_added_params"] = self.shared_added_params
        out["reward_to_generator_forward"] = self.reward_forward_flops / self.generator_forward_flops
        return out


def _count(fn) -> tuple[Any, int]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, counter.get_total_flops()


def _forward_backward(fn, latents: torch.Tensor) -> tuple[int, int]:
    out, fwd = _count(fn)
    _, bwd = _count(lambda: torch.autograd.grad(out.float().sum(), latents))
    return fwd, bwd


def dina_lrm_cost(
    config: DiNaLRMConfig | None = None,
    transformer_config: dict[str, Any] | None = None,
    resolution: int = 512,
    batch_size: int = 1,
    text_tokens: int | None = None,
    vae_scale: int = SD35_VAE_SCALE,
) -> CostReport:
    """Parameters and forward/backward FLOPs of the reward (single noise level) and of the generator."""
    from diffusers import SD3Transformer2DModel

    config = config or DiNaLRMConfig()
    transformer_config = dict(transformer_config or SD35M_TRANSFORMER_CONFIG)
    text_tokens = text_tokens or CLIP_TOKENS + config.max_sequence_length
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**transformer_config)
    transformer.requires_grad_(False)
    generator_params = sum(p.numel() for p in transformer.parameters())

    side = resolution // vae_scale
    cfg = transformer.config
    with torch.device("meta"):
        latents = torch.empty(batch_size, cfg.in_channels, side, side, requires_grad=True)
        text = TextConditioning(torch.empty(batch_size, text_tokens, cfg.joint_attention_dim),
                                torch.empty(batch_size, cfg.pooled_projection_dim))
        sigmas = torch.full((batch_size,), EVAL_SIGMA)

    def generator_forward():
        return transformer(hidden_states=latents, encoder_hidden_states=text.encoder_hidden_states,
                           pooled_projections=text.pooled_projections, timestep=TIMESTEP_SCALE * sigmas,
                           return_dict=False)[0]

    # counted before the reward is built: its own backbone holds the same blocks, and its LoRA goes onto them
    gen_fwd, gen_bwd = _forward_backward(generator_forward, latents)
    model = DiNaLRM.build(config, transformer)
    model.set_trainable(lora=False, head=False)
    backbone = model.tapped_backbone
    lora = sum(p.numel() for p in model.lora_parameters())
    backbone_params = sum(p.numel() for p in backbone.parameters()) - lora
    head = sum(p.numel() for p in model.head_parameters())
    reward_fwd, reward_bwd = _forward_backward(lambda: model.score(latents, sigmas, text), latents)
    return CostReport(resolution=resolution, batch_size=batch_size, text_tokens=text_tokens,
                      reward_backbone_params=backbone_params, reward_lora_params=lora, reward_head_params=head,
                      generator_params=generator_params, reward_forward_flops=reward_fwd,
                      reward_backward_flops=reward_bwd, generator_forward_flops=gen_fwd,
                      generator_backward_flops=gen_bwd)
