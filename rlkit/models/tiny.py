"""Tiny SD3-family pipelines built from configs, for tests and the Shapes world.

Everything is built locally (no download): a tiny ``SD3Transformer2DModel`` with dual-attention blocks and
qk RMS-norm, a tiny ``AutoencoderKL``, two tiny CLIP text encoders with projection, a tiny T5 encoder and
word-level tokenizers for them. ``save_pretrained`` writes a folder that loads back through the same
``from_pretrained`` path as ``stabilityai/stable-diffusion-3.5-medium``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlkit.models.sd3 import vae_scale_factor

DEFAULT_WORDS = (
    "a an the of on in at and with image photo picture "
    "red green blue yellow purple orange white black gray pink cyan "
    "circle square triangle cross ring diamond star "
    "top bottom left right center middle upper lower corner "
    "small large big one two three background shape"
).split()


@dataclass
class TinySD3Config:
    """Sizes of a tiny SD3 pipeline. Defaults give a model that runs a step in milliseconds on a CPU."""

    sample_size: int = 8  # latent height/width used for pos-embed tables
    patch_size: int = 1
    latent_channels: int = 4
    num_layers: int = 4
    attention_head_dim: int = 8
    num_attention_heads: int = 4
    dual_attention_layers: tuple[int, ...] = (0, 1)
    qk_norm: str | None = "rms_norm"
    clip_hidden: int = 16
    clip_layers: int = 2
    clip_projection: int = 16
    t5_d_model: int = 32
    t5_layers: int = 1
    max_clip_length: int = 16
    vae_block_out_channels: tuple[int, ...] = (8, 16)
    vae_norm_num_groups: int | None = None  # GroupNorm groups of the VAE; None: min(vae_block_out_channels)
    vae_mid_attention: bool = True  # self-attention in the VAE's middle block
    # side of the transformer's sin-cos position grid, in patches (None: 2 * sample_size, the earlier default).
    # Positions are scaled so that the grid spans sample_size // patch_size units: a grid larger than the
    # picture's own patch grid squeezes neighbouring patches into nearly equal embeddings.
    pos_embed_max_size: int | None = None
    vae_scaling_factor: float = 1.5
    vae_shift_factor: float = 0.1
    scheduler_shift: float = 3.0
    words: tuple[str, ...] = field(default_factory=lambda: tuple(DEFAULT_WORDS))

    @property
    def joint_attention_dim(self) -> int:
        return self.t5_d_model

    @property
    def pooled_projection_dim(self) -> int:
        return 2 * self.clip_projection

    @property
    def image_size(self) -> int:
        return self.sample_size * vae_scale_factor(self.vae_block_out_channels)


def _clip_tokenizer(words: tuple[str, ...], max_length: int):
    """A real ``CLIPTokenizer`` whose BPE merges are built to make each word of ``words`` one token, in order.

    A merge learnt for an earlier word can apply inside a later one first and split it (8 of
    ``DEFAULT_WORDS`` come out as several tokens: ``green``, ``triangle``, ...); the Shapes vocabulary is one token
    a word (tested), which its captions' lengths rely on."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            merge = (current, nxt)
            current = current + nxt
            if merge not in seen:
                seen.add(merge)
                merges.append(merge)
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _t5_tokenizer(words: tuple[str, ...]):
    from transformers import T5TokenizerFast

    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [("\u2581", -5.0)] + [(c, -10.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def build_tiny_sd3_components(config: TinySD3Config | None = None, seed: int = 0) -> dict:
    """The ``StableDiffusion3Pipeline`` components of a tiny model, randomly initialised from ``seed``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    cfg = config or TinySD3Config()
    if 2 * cfg.clip_hidden > cfg.t5_d_model:
        raise ValueError("TinySD3Config: t5_d_model must be >= 2 * clip_hidden (SD3 pads CLIP states to T5 width)")
    groups = cfg.vae_norm_num_groups
    if groups is not None and any(c % groups for c in cfg.vae_block_out_channels):
        raise ValueError(f"TinySD3Config.vae_norm_num_groups={groups} must divide every vae_block_out_channels "
                         f"entry {tuple(cfg.vae_block_out_channels)}")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.latent_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim,
        caption_projection_dim=cfg.attention_head_dim * cfg.num_attention_heads,
        pooled_projection_dim=cfg.pooled_projection_dim,
        out_channels=cfg.latent_channels,
        pos_embed_max_size=cfg.pos_embed_max_size or cfg.sample_size * 2,
        dual_attention_layers=tuple(cfg.dual_attention_layers),
        qk_norm=cfg.qk_norm,
    )
    tokenizer = _clip_tokenizer(cfg.words, cfg.max_clip_length)
    clip_config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=cfg.clip_hidden,
        intermediate_size=2 * cfg.clip_hidden,
        num_attention_heads=2,
        num_hidden_layers=cfg.clip_layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=cfg.max_clip_length,
        projection_dim=cfg.clip_projection,
        hidden_act="gelu",
    )
    text_encoder = CLIPTextModelWithProjection(clip_config)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    tokenizer_3 = _t5_tokenizer(cfg.words)
    t5_config = T5Config(
        vocab_size=len(tokenizer_3),
        d_model=cfg.t5_d_model,
        d_kv=8,
        d_ff=2 * cfg.t5_d_model,
        num_layers=cfg.t5_layers,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer_3.pad_token_id,
        eos_token_id=tokenizer_3.eos_token_id,
    )
    text_encoder_3 = T5EncoderModel(t5_config)
    n = len(cfg.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_block_out_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_num_groups or min(cfg.vae_block_out_channels),
        mid_block_add_attention=cfg.vae_mid_attention,
        sample_size=cfg.image_size,
        scaling_factor=cfg.vae_scaling_factor,
        shift_factor=cfg.vae_shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.scheduler_shift)
    for module in (transformer, text_encoder, text_encoder_2, text_encoder_3, vae):
        module.eval()  # as from_pretrained leaves them: dropout off
    return {
        "transformer": transformer,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": _clip_tokenizer(cfg.words, cfg.max_clip_length),
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": tokenizer_3,
    }


def build_tiny_sd3_pipeline(config: TinySD3Config | None = None, seed: int = 0):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**build_tiny_sd3_components(config, seed))


def save_tiny_sd3(path: str | Path, config: TinySD3Config | None = None, seed: int = 0) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it to ``path`` (the layout of a hub SD3 folder)."""
    path = Path(path)
    build_tiny_sd3_pipeline(config, seed).save_pretrained(path)
    return path
