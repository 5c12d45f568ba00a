"""PickScore (yuvalkirstain/PickScore_v1): CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

Score of an (image, prompt) pair: ``logit_scale.exp() * cos(text_embedding, image_embedding)`` (about
20-23 for SD-class images). Images enter as ``(B, 3, H, W)`` tensors in [0, 1] and go through
``rewards.pixels.clip_preprocess`` (shortest side to 224 with antialiased bicubic, centre crop 224, CLIP
normalisation), the tensor form of the ``CLIPImageProcessor`` of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; so scores are differentiable for ReFL. Text embeddings are cached
per prompt. The optional affine normalisation (flow_grpo divides by 26) is a named setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rewards.base import Reward, RewardInput, RewardOutput, affine_normalizer
from rewards.pixels import clip_preprocess, reward_pixels

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TEXT_MAX_LENGTH = 77  # CLIP's context length


@dataclass
class PickScoreConfig:
    """``model``: CLIP weights; ``processor``: tokenizer + image-processor settings (hub id or local folder)."""

    model: str = DEFAULT_MODEL
    processor: str = DEFAULT_PROCESSOR
    dtype: str = "fp32"
    device: str = "cpu"
    micro_batch_size: int = 32
    normalize: Literal["raw", "affine"] = "raw"
    shift: float = 0.0  # affine: (raw + shift) / scale, e.g. scale 26 as in flow_grpo
    scale: float = 1.0
    revision: str | None = None

    def __post_init__(self) -> None:
        from rlkit.models.sd3 import resolve_dtype

        resolve_dtype(self.dtype)
        if self.micro_batch_size < 1:
            raise ValueError(f"PickScoreConfig.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.normalize not in ("raw", "affine"):
            raise ValueError(f"PickScoreConfig.normalize must be 'raw' or 'affine', got {self.normalize!r}")
        if self.scale == 0:
            raise ValueError("PickScoreConfig.scale must be non-zero")


def _features(out) -> Tensor:
    """transformers returns the projected embedding either as a tensor or as ``pooler_output``."""
    return out if isinstance(out, Tensor) else out.pooler_output


class PickScoreReward(Reward):
    """PickScore of each (image, prompt) pair; extras: ``raw`` (before the affine normalisation)."""

    space = "pixel"
    noise_aware = False
    differentiable = True
    args_class = PickScoreConfig

    def __init__(self, **kwargs):
        super().__init__()
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from rlkit.models.sd3 import explain_missing, resolve_dtype

        self.config = cfg = PickScoreConfig(**kwargs)
        self._normalize = affine_normalizer(cfg.shift, cfg.scale)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.processor, revision=cfg.revision)
            self.image_processor = AutoImageProcessor.from_pretrained(cfg.processor, revision=cfg.revision)
        except (OSError, ValueError) as exc:
            raise explain_missing(cfg.processor, exc, "CLIP processor") from None
        try:
            self.model = CLIPModel.from_pretrained(cfg.model, dtype=resolve_dtype(cfg.dtype), revision=cfg.revision)
        except (OSError, ValueError) as exc:
            raise explain_missing(cfg.model, exc, "PickScore CLIP model") from None
        self.model.to(cfg.device).eval().requires_grad_(False)
        self._text_cache: dict[str, Tensor] = {}
        self._decode = None

    @staticmethod
    def meta_cost(resolution: int, batch_size: int = 1, decode: bool = True):
        """Parameters and FLOPs of VAE decode + this reward at ``resolution`` (``rewards.cost.Cost``)."""
        from rewards.cost import meta_cost

        return meta_cost("pickscore", resolution, batch_size, decode)

    def attach_generator(self, generator: object) -> None:
        self._decode = getattr(generator, "decode", None)

    def train(self, mode: bool = True) -> "PickScoreReward":
        """A frozen reward stays in inference mode whatever mode a trainer sets."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    @property
    def device(self) -> torch.device:
        """Where the model is now (it may have been moved after construction)."""
        return self.model.logit_scale.device

    def preprocess(self, images: Tensor) -> Tensor:
        """``CLIPImageProcessor`` as tensor ops (differentiable)."""
        ip = self.image_processor
        crop = (ip.crop_size["height"], ip.crop_size["width"])
        return clip_preprocess(images, ip.size["shortest_edge"], crop, ip.image_mean, ip.image_std)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """Unit-norm text embeddings ``(B, D)``, computed once per distinct prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            tok = self.tokenizer(missing, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                                 return_tensors="pt").to(self.device)
            emb = _features(self.model.get_text_features(**tok)).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            self._text_cache.update(zip(missing, emb))
        return torch.stack([self._text_cache[p] for p in prompts]).to(self.device)

    def image_embeddings(self, pixel_values: Tensor) -> Tensor:
        emb = _features(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)))
        emb = emb.float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def raw_scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``(B,)`` PickScore on ``images``' device; a graph is kept only when grad is on and ``images`` require it."""
        text = self.text_embeddings(prompts)
        track = torch.is_grad_enabled() and images.requires_grad
        scale = self.model.logit_scale.exp().float()
        outs = []
        with torch.set_grad_enabled(track):
            for start in range(0, len(prompts), self.config.micro_batch_size):
                chunk = images[start : start + self.config.micro_batch_size]
                image_emb = self.image_embeddings(self.preprocess(chunk))
                outs.append(scale * (image_emb * text[start : start + chunk.shape[0]]).sum(dim=-1))
            return torch.cat(outs).to(images.device)

    def forward(self, batch: RewardInput) -> RewardOutput:
        raw = self.raw_scores(reward_pixels(batch, self._decode), batch.prompts)
        scores = raw if self.config.normalize == "raw" else self._normalize(raw)
        return RewardOutput(scores=scores, extras={"raw": raw.detach()})
