"""Parameters and FLOPs of the pixel reward paths, counted on the meta device (no weights, no compute).

The real architectures are written here as config objects, since their config files cannot be
downloaded: SD3.5-Medium's VAE, CLIP ViT-H/14 (PickScore) and Qwen2-VL-7B-Instruct (HPSv3). Each
function builds the modules on ``torch.device("meta")`` and runs them under
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention are counted; one
multiply-add = 2 FLOPs; norms and activations are not). Benchmarks call :func:`meta_cost`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

SD35M_VAE_CONFIG: dict[str, Any] = dict(  # stabilityai/stable-diffusion-3.5-medium, vae/config.json
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    sample_size=1024,
)
VAE_DOWNSAMPLE = 8  # 2 ** (len(block_out_channels) - 1)

CLIP_VIT_H14_CONFIG: dict[str, Any] = dict(  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K (= PickScore_v1's architecture)
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5),
    projection_dim=1024,
)
CLIP_TEXT_LENGTH = 77

QWEN2VL_7B_CONFIG: dict[str, Any] = dict(  # Qwen/Qwen2-VL-7B-Instruct, config.json
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=32768,
                     hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                                         "mrope_section": [16, 24, 24]},
                     bos_token_id=151643, eos_token_id=151645),
    vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_channels=3, hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)
HPSV3_VOCAB = 151658  # Qwen2-VL tokenizer (151657) + <|Reward|>: HPSv3 resized its embeddings to this
CHARS_PER_TOKEN = 4.0  # estimate for English text under Qwen2's BPE (the tokenizer cannot be downloaded)
PROMPT_CHARS = 80  # a typical text-to-image prompt


@dataclass
class PartCost:
    params: int
    flops: int  # for the whole batch
    note: str = ""


@dataclass
class Cost:
    """Per-part parameters and FLOPs of one reward call on ``batch_size`` images of ``resolution``."""

    resolution: int
    batch_size: int
    parts: dict[str, PartCost] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(p.params for p in self.parts.values())

    @property
    def flops(self) -> int:
        return sum(p.flops for p in self.parts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "batch_size": self.batch_size, "params": self.params,
                "flops": self.flops, "parts": {k: vars(v) for k, v in self.parts.items()}}


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(fn, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def vae_decode_part(resolution: int, batch_size: int = 1, vae_config: dict[str, Any] | None = None) -> PartCost:
    """The VAE decoder turning ``(B, 16, res/8, res/8)`` latents into images."""
    from diffusers import AutoencoderKL

    if resolution % VAE_DOWNSAMPLE:
        raise ValueError(f"resolution must be a multiple of {VAE_DOWNSAMPLE}, got {resolution}")
    cfg = vae_config or SD35M_VAE_CONFIG
    with torch.device("meta"):
        vae = AutoencoderKL(**cfg)
        latents = torch.empty(batch_size, cfg["latent_channels"], resolution // VAE_DOWNSAMPLE,
                              resolution // VAE_DOWNSAMPLE)
    params = _count_params(vae.decoder) + (_count_params(vae.post_quant_conv) if vae.post_quant_conv else 0)
    return PartCost(params, _flops(vae.decode, latents), "SD3.5-M VAE decoder")


def pickscore_parts(batch_size: int = 1) -> dict[str, PartCost]:
    """CLIP ViT-H/14 on 224 x 224 crops, and its text tower on 77 tokens (cached per prompt by the reward)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(**CLIP_VIT_H14_CONFIG)
    config._attn_implementation = "sdpa"
    size = config.vision_config.image_size
    with torch.device("meta"):
        model = CLIPModel(config)
        pixels = torch.empty(batch_size, 3, size, size)
        ids = torch.zeros(batch_size, CLIP_TEXT_LENGTH, dtype=torch.long)
    vision = _count_params(model.vision_model) + _count_params(model.visual_projection)
    text = _count_params(model.text_model) + _count_params(model.text_projection)
    return {
        "clip_vision": PartCost(vision + 1, _flops(model.get_image_features, pixel_values=pixels),
                                "ViT-H/14 at 224 (+ logit_scale)"),
        "clip_text": PartCost(text, _flops(model.get_text_features, input_ids=ids),
                              "77 tokens; once per distinct prompt (cached)"),
    }


def hpsv3_text_tokens(prompt_chars: int = PROMPT_CHARS) -> int:
    """Estimated text tokens of HPSv3's chat around one image (the rubric dominates)."""
    from rewards.hpsv3 import hpsv3_chat_text

    return round(len(hpsv3_chat_text("x" * prompt_chars, num_image_tokens=0)) / CHARS_PER_TOKEN)


def hpsv3_geometry(resolution: int, text_tokens: int | None = None):
    """``(config, gh, gw, image_tokens, seq)``: the Qwen2-VL-7B config HPSv3 runs, its patch grid for a square
    picture of ``resolution`` and the decoder's visual and total token counts."""
    from transformers import Qwen2VLConfig

    from rewards.hpsv3 import hpsv3_image_size

    config = Qwen2VLConfig(**QWEN2VL_7B_CONFIG)
    config.text_config.vocab_size = HPSV3_VOCAB
    vc = config.vision_config
    h, w = hpsv3_image_size(resolution, resolution)
    gh, gw = h // vc.patch_size, w // vc.patch_size
    image_tokens = gh * gw // vc.spatial_merge_size**2
    text = text_tokens if text_tokens is not None else hpsv3_text_tokens()
    return config, gh, gw, image_tokens, image_tokens + text


def hpsv3_parts(resolution: int, batch_size: int = 1, text_tokens: int | None = None) -> dict[str, PartCost]:
    """Qwen2-VL-7B on the resized image (448 x 448 for square images: 1024 patches -> 256 tokens) plus the
    chat text, and the reward head."""
    from transformers import Qwen2VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import get_vision_position_ids

    from rewards.hpsv3 import rm_head

    config, gh, gw, image_tokens, seq = hpsv3_geometry(resolution, text_tokens)
    vc = config.vision_config
    grid = torch.tensor([[1, gh, gw]] * batch_size)
    with torch.device("meta"):
        model = Qwen2VLModel._from_config(config, attn_implementation="sdpa")
        head = rm_head(config.text_config.hidden_size)
        patches = torch.empty(batch_size * gh * gw, 3 * vc.temporal_patch_size * vc.patch_size**2)
        embeds = torch.empty(batch_size, seq, config.text_config.hidden_size)
        hidden = torch.empty(batch_size, config.text_config.hidden_size)
    # the vision tower's per-image attention splits need the segment lengths on the host
    vision_kwargs = dict(position_ids=get_vision_position_ids(grid, vc.spatial_merge_size).to("meta"),
                         cu_seqlens=torch.arange(batch_size + 1, dtype=torch.int32) * gh * gw)
    return {
        "qwen2vl_vision": PartCost(_count_params(model.visual), _flops(model.visual, patches, grid_thw=grid,
                                                                       **vision_kwargs), f"{gh * gw} patches"),
        "qwen2vl_decoder": PartCost(_count_params(model.language_model),
                                    _flops(model.language_model, inputs_embeds=embeds, use_cache=False),
                                    f"{seq} tokens ({image_tokens} visual)"),
        "rm_head": PartCost(_count_params(head), _flops(head, hidden), "fp32 MLP"),
    }


def meta_cost(reward: str, resolution: int, batch_size: int = 1, decode: bool = True) -> Cost:
    """Cost of ``reward`` ("pickscore" or "hpsv3") on generated images: VAE decode (when ``decode``) + the model."""
    parts: dict[str, PartCost] = {}
    if decode:
        parts["vae_decode"] = vae_decode_part(resolution, batch_size)
    if reward == "pickscore":
        parts.update(pickscore_parts(batch_size))
    elif reward == "hpsv3":
        parts.update(hpsv3_parts(resolution, batch_size))
    else:
        raise ValueError(f"meta_cost knows 'pickscore' and 'hpsv3', not {reward!r}")
    return Cost(resolution=resolution, batch_size=batch_size, parts=parts)
