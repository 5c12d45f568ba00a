"""Tiny random-weight stand-ins for the pixel reward models, built from configs with local tokenizers.

``save_tiny_pickscore`` writes a folder that ``CLIPModel.from_pretrained`` / ``AutoProcessor.from_pretrained``
read exactly like ``yuvalkirstain/PickScore_v1`` + ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``;
``save_tiny_hpsv3`` writes a Qwen2-VL folder (the layout of ``Qwen/Qwen2-VL-7B-Instruct``) and an
``HPSv3.safetensors`` file with the key layout of ``MizzenAI/HPSv3``. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rewards.hpsv3 import QWEN2VL_CHAT_TEMPLATE, REWARD_TOKEN, hpsv3_user_text, rm_head
from rlkit.models.tiny import DEFAULT_WORDS, _clip_tokenizer

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@dataclass
class TinyClipConfig:
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    projection: int = 16
    image_size: int = 28
    patch_size: int = 7
    max_text_length: int = 77
    logit_scale_init: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature


def save_tiny_pickscore(path: str | Path, config: TinyClipConfig | None = None, seed: int = 0) -> Path:
    """A tiny ``CLIPModel`` + ``CLIPProcessor`` folder (random weights from ``seed``)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    cfg = config or TinyClipConfig()
    path = Path(path)
    tokenizer = _clip_tokenizer(tuple(DEFAULT_WORDS), cfg.max_text_length)
    common = dict(hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden, num_hidden_layers=cfg.layers,
                  num_attention_heads=cfg.heads, hidden_act="gelu")
    clip_config = CLIPConfig(
        text_config=dict(common, vocab_size=len(tokenizer), max_position_embeddings=cfg.max_text_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(common, image_size=cfg.image_size, patch_size=cfg.patch_size),
        projection_dim=cfg.projection,
        logit_scale_init_value=cfg.logit_scale_init,
    )
    torch.manual_seed(seed)
    CLIPModel(clip_config).eval().save_pretrained(path)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@dataclass
class TinyQwen2VLConfig:
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    vision_embed: int = 16
    vision_depth: int = 2
    vision_heads: int = 2
    patch_size: int = 4
    merge_size: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2


def _qwen_tokenizer(corpus: str = ""):
    """A byte-level BPE ``Qwen2TokenizerFast`` with Qwen2-VL's special tokens; every word of ``corpus``
    (as Qwen2's pre-tokenizer splits it) becomes one token, other text falls back to single bytes."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    plain = Qwen2TokenizerFast(vocab=dict(vocab), merges=[])
    merges: list[tuple[str, str]] = []
    for piece, _ in plain.backend_tokenizer.pre_tokenizer.pre_tokenize_str(corpus):
        current = piece[0]
        for char in piece[1:]:
            if current + char not in vocab:
                merges.append((current, char))
                vocab[current + char] = len(vocab)
            current += char
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tok.add_special_tokens({"pad_token": QWEN_SPECIAL_TOKENS[0], "eos_token": "<|im_end|>"})
    return tok


def save_tiny_hpsv3(path: str | Path, config: TinyQwen2VLConfig | None = None, seed: int = 0) -> tuple[Path, Path]:
    """A tiny Qwen2-VL base folder and a full HPSv3 reward checkpoint for it.

    Returns ``(base_folder, checkpoint_file)``. The checkpoint is built as HPSv3's training did: the base
    model with ``<|Reward|>`` added to the tokenizer, embeddings resized to the new vocabulary, and an
    ``rm_head``; its keys use the transformers-4.45 layout (``visual.*``, ``model.*``, ``lm_head.*``,
    ``rm_head.*``) of the released ``HPSv3.safetensors``.
    """
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    cfg = config or TinyQwen2VLConfig()
    path = Path(path)
    tokenizer = _qwen_tokenizer(hpsv3_user_text(" ".join(DEFAULT_WORDS)))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    qwen_config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                             "mrope_section": list(cfg.mrope_section)},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=cfg.vision_depth, embed_dim=cfg.vision_embed, hidden_size=cfg.hidden, num_heads=cfg.vision_heads,
            patch_size=cfg.patch_size, spatial_merge_size=cfg.merge_size, temporal_patch_size=2, mlp_ratio=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(qwen_config).eval()
    model.save_pretrained(path)
    factor = cfg.patch_size * cfg.merge_size
    image_processor = Qwen2VLImageProcessor(
        patch_size=cfg.patch_size, merge_size=cfg.merge_size, temporal_patch_size=2,
        size={"shortest_edge": 4 * factor * factor, "longest_edge": 64 * factor * factor},
    )
    image_processor.save_pretrained(path)
    tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    # the reward checkpoint: base + reward token + head, in the released key layout
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    head = rm_head(cfg.hidden)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.visual."):
            key = "visual." + key[len("model.visual."):]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        state[key] = value.detach().clone().contiguous()
    state.update({f"rm_head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    checkpoint = path / "HPSv3.safetensors"
    save_file(state, str(checkpoint))
    return path, checkpoint
