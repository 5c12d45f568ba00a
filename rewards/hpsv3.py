"""HPSv3 (MizzenAI/HPSv3): a Qwen2-VL-7B-Instruct reward model read at a special reward token.

Faithful to the released model (``hpsv3`` 1.0.0, trained with transformers 4.45):

- input: one user chat turn ``[image, text]`` where the text is HPSv3's rubric with the prompt, followed
  by ``"Please provide the overall ratings of this image: <|Reward|>"``; Qwen2-VL's default system turn
  and the assistant generation prompt around it;
- the image is resized to a fixed pixel budget ``min = max = 256 * 28 * 28`` (448 x 448 for square
  images, 256 visual tokens after the 2 x 2 merge);
- the language model runs with plain sequential positions (HPSv3 calls the decoder directly, so the
  multimodal 3-D rope positions are not used), the last hidden state at ``<|Reward|>`` goes through an
  fp32 MLP head ``hidden -> 1024 -> 16 -> 2`` giving ``(mu, sigma)``; the score is ``mu``.

The checkpoint ``HPSv3.safetensors`` holds the whole model (base weights included, vocabulary resized
to the tokenizer with ``<|Reward|>``), so only the base model's config and processor are read from
``model`` / ``processor``; the weights come from the checkpoint alone, loaded strictly (the unused
``lm_head`` is the one key dropped). Images enter as tensors and are preprocessed with tensor ops
(``rewards.pixels.qwen2vl_preprocess``), so scores are differentiable for ReFL; without a request for
gradients nothing is kept (the upstream package once ran out of memory by keeping them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from rewards.base import Reward, RewardInput, RewardOutput, affine_normalizer
from rewards.pixels import qwen2vl_preprocess, reward_pixels, smart_resize

DEFAULT_BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
DEFAULT_CHECKPOINT = "MizzenAI/HPSv3"
DEFAULT_CHECKPOINT_FILE = "HPSv3.safetensors"

REWARD_TOKEN = "<|Reward|>"
IMAGE_TOKEN = "<|image_pad|>"
PIXEL_BUDGET = 256 * 28 * 28  # HPSv3's min_pixels = max_pixels
RM_HEAD_DIMS = (1024, 16)  # hidden -> 1024 -> 16 -> (mu, sigma)

# HPSv3's rubric, verbatim (trailing spaces included: they are part of the trained prompt).
INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the "
    "worst and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense "
    "of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, "
    "or adult material. If such content is present, the image quality and satisfaction score should be the "
    "lowest possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, "
    "appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well "
    "the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the "
    "image logically fit the scenario described in the prompt. The environment should support and enhance the "
    "subject without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in "
    "the image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
RATING_REQUEST = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"

QWEN2VL_SYSTEM_PROMPT = "You are a helpful assistant."
# Qwen2-VL-Instruct's chat template, for images and text (what `apply_chat_template` renders).
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    + QWEN2VL_SYSTEM_PROMPT
    + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def hpsv3_user_text(prompt: str) -> str:
    """The text part of HPSv3's user turn for ``prompt``."""
    return INSTRUCTION.format(text_prompt=prompt) + RATING_REQUEST


def hpsv3_chat_text(prompt: str, num_image_tokens: int = 1) -> str:
    """The whole chat as the model reads it, with ``<|image_pad|>`` repeated ``num_image_tokens`` times
    (1 gives the rendered chat template before the processor expands the image placeholder)."""
    return (
        f"<|im_start|>system\n{QWEN2VL_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|>{IMAGE_TOKEN * num_image_tokens}<|vision_end|>{hpsv3_user_text(prompt)}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def hpsv3_image_size(height: int, width: int, pixels: int = PIXEL_BUDGET, factor: int = 28) -> tuple[int, int]:
    """The size an image is resized to under a fixed pixel budget (``min_pixels = max_pixels = pixels``)."""
    return smart_resize(height, width, factor=factor, min_pixels=pixels, max_pixels=pixels)


def hpsv3_num_image_tokens(height: int, width: int, patch_size: int = 14, merge_size: int = 2,
                           pixels: int = PIXEL_BUDGET) -> int:
    """Visual tokens the language model reads for one image: ``(H / p) * (W / p) / m^2``."""
    h, w = hpsv3_image_size(height, width, pixels, patch_size * merge_size)
    return (h // patch_size) * (w // patch_size) // (merge_size * merge_size)


@dataclass
class HPSv3Config:
    """Where the model comes from and how it runs. ``model``/``processor``/``checkpoint``: hub id or local path."""

    model: str = DEFAULT_BASE_MODEL  # base Qwen2-VL: its config (architecture) and, by default, its processor
    processor: str | None = None  # defaults to `model`
    checkpoint: str = DEFAULT_CHECKPOINT  # hub repo id, a folder holding `checkpoint_file`, or the file itself
    checkpoint_file: str = DEFAULT_CHECKPOINT_FILE
    dtype: str = "bf16"
    device: str = "cpu"
    micro_batch_size: int = 4  # images per forward pass
    pixels: int = PIXEL_BUDGET
    gradient_checkpointing: bool = False  # recompute decoder layers in backward (ReFL through the 7B model)
    attn_implementation: str = "sdpa"
    normalize: Literal["raw", "affine"] = "raw"
    shift: float = 0.0  # affine: (mu + shift) / scale
    scale: float = 1.0
    revision: str | None = None

    def __post_init__(self) -> None:
        from rlkit.models.sd3 import resolve_dtype

        resolve_dtype(self.dtype)
        if self.micro_batch_size < 1:
            raise ValueError(f"HPSv3Config.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.pixels < 1:
            raise ValueError(f"HPSv3Config.pixels must be positive, got {self.pixels}")
        if self.normalize not in ("raw", "affine"):
            raise ValueError(f"HPSv3Config.normalize must be 'raw' or 'affine', got {self.normalize!r}")
        if self.scale == 0:
            raise ValueError("HPSv3Config.scale must be non-zero")


def resolve_checkpoint(source: str, filename: str, revision: str | None = None) -> Path:
    """A local checkpoint file: ``source`` itself, ``source/filename``, or the hub/cache copy of it."""
    from huggingface_hub import hf_hub_download

    from rlkit.models.sd3 import explain_missing

    local = Path(source).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if (local / filename).is_file():
            return local / filename
        raise explain_missing(str(local), FileNotFoundError(f"no {filename} in it"), "HPSv3 checkpoint")
    try:
        return Path(hf_hub_download(repo_id=source, filename=filename, revision=revision))
    except (OSError, ValueError) as exc:
        raise explain_missing(source, exc, f"HPSv3 checkpoint ({filename})") from None


def _remap_checkpoint_key(key: str) -> str | None:
    """Released (transformers 4.45) or current key -> key of :class:`HPSv3Model`; None for unused keys."""
    if key.startswith("lm_head."):
        return None  # the reward reads hidden states, never next-token logits
    for old, new in (("model.visual.", "backbone.visual."), ("model.language_model.", "backbone.language_model."),
                     ("visual.", "backbone.visual."), ("model.", "backbone.language_model."), ("rm_head.", "rm_head.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def rm_head(hidden_size: int) -> nn.Sequential:
    """HPSv3's ``ranknet`` head (module indices match the checkpoint: 0, 3, 5). Its training dropout (0.05) is
    fixed at 0 here: the reward only ever runs inference, whatever mode a trainer sets."""
    return nn.Sequential(
        nn.Linear(hidden_size, RM_HEAD_DIMS[0]), nn.ReLU(), nn.Dropout(0.0),
        nn.Linear(RM_HEAD_DIMS[0], RM_HEAD_DIMS[1]), nn.ReLU(), nn.Linear(RM_HEAD_DIMS[1], 2),
    )


class HPSv3Model(nn.Module):
    """Qwen2-VL (vision tower + decoder, no LM head) and the fp32 reward head."""

    def __init__(self, config, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import Qwen2VLModel

        self.backbone = Qwen2VLModel._from_config(config, attn_implementation=attn_implementation)
        self.rm_head = rm_head(config.text_config.hidden_size).float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor,
                reward_token_id: int, image_token_id: int) -> Tensor:
        """``(B, 2)`` = ``(mu, sigma)`` read at the reward token."""
        lm = self.backbone.language_model
        embeds = lm.embed_tokens(input_ids)
        vision = self.backbone.visual(pixel_values.to(embeds.dtype), grid_thw=image_grid_thw)
        image_embeds = vision.pooler_output if hasattr(vision, "pooler_output") else vision
        image_mask = (input_ids == image_token_id).unsqueeze(-1).expand_as(embeds)
        if image_mask[..., 0].sum() != image_embeds.shape[0]:
            raise ValueError(f"{int(image_mask[..., 0].sum())} image tokens in the text, {image_embeds.shape[0]} "
                             "image embeddings")
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        # position_ids=None: plain sequential positions, as the released model was trained
        hidden = lm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        at_token = input_ids == reward_token_id
        counts = at_token.sum(dim=1)
        if not bool((counts == 1).all()):
            raise ValueError(f"every sequence needs exactly one {REWARD_TOKEN} token, got counts {counts.tolist()}")
        return self.rm_head(hidden[at_token].float())


class HPSv3Reward(Reward):
    """``mu`` of HPSv3's ``(mu, sigma)``; extras: ``raw`` (mu) and ``sigma``."""

    space = "pixel"
    noise_aware = False
    differentiable = True
    args_class = HPSv3Config

    def __init__(self, **kwargs):
        super().__init__()
        self.config = HPSv3Config(**kwargs)
        self._normalize = affine_normalizer(self.config.shift, self.config.scale)
        self.tokenizer, self.image_processor, self.model = self._load(self.config)
        self.train(False)
        self.reward_token_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self._decode = None

    @staticmethod
    def _load(cfg: HPSv3Config):
        from accelerate import init_empty_weights
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        from rlkit.models.sd3 import explain_missing, resolve_dtype

        processor_source = cfg.processor or cfg.model
        try:
            model_config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision)
        except (OSError, ValueError) as exc:
            raise explain_missing(cfg.model, exc, "Qwen2-VL base model (config)") from None
        try:  # tokenizer and image processor only: the video processor of AutoProcessor needs torchvision
            tokenizer = AutoTokenizer.from_pretrained(processor_source, revision=cfg.revision)
            image_processor = AutoImageProcessor.from_pretrained(processor_source, revision=cfg.revision)
        except (OSError, ValueError) as exc:
            raise explain_missing(processor_source, exc, "Qwen2-VL tokenizer / image processor") from None
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]}, replace_extra_special_tokens=False)
        model_config.text_config.vocab_size = len(tokenizer)
        checkpoint = resolve_checkpoint(cfg.checkpoint, cfg.checkpoint_file, cfg.revision)

        with init_empty_weights():  # parameters on meta; the checkpoint supplies all of them
            model = HPSv3Model(model_config, cfg.attn_implementation)
        state: dict[str, Tensor] = {}
        for key, value in load_file(str(checkpoint)).items():
            new_key = _remap_checkpoint_key(key)
            if new_key is not None:
                state[new_key] = value
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"HPSv3 checkpoint {str(checkpoint)!r} does not match the model built from "
                             f"{cfg.model!r}: missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
                             f"({len(unexpected)})")
        for name, param in model.state_dict().items():
            if state[name].shape != param.shape:
                raise ValueError(f"HPSv3 checkpoint {str(checkpoint)!r}: {name} has shape {tuple(state[name].shape)}, "
                                 f"the model built from {cfg.model!r} expects {tuple(param.shape)}")
        model.load_state_dict(state, strict=True, assign=True)
        # the whole backbone is cast, rotary buffers included, as HPSv3's own loader does (`model.to(bf16)`)
        model.backbone.to(device=cfg.device, dtype=resolve_dtype(cfg.dtype))
        model.rm_head.to(device=cfg.device, dtype=torch.float32)
        model.requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return tokenizer, image_processor, model

    def train(self, mode: bool = True) -> "HPSv3Reward":
        """A frozen reward stays in inference mode; only with gradient checkpointing is the backbone flagged
        as training, because transformers checkpoints only then (Qwen2-VL has no active dropout)."""
        super().train(mode)
        self.model.eval()
        self.model.backbone.train(self.config.gradient_checkpointing)
        return self

    @staticmethod
    def meta_cost(resolution: int, batch_size: int = 1, decode: bool = True):
        """Parameters and FLOPs of VAE decode + this reward at ``resolution`` (``rewards.cost.Cost``)."""
        from rewards.cost import meta_cost

        return meta_cost("hpsv3", resolution, batch_size, decode)

    def attach_generator(self, generator: object) -> None:
        self._decode = getattr(generator, "decode", None)

    # -- preprocessing ------------------------------------------------------------------------------
    def preprocess(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(pixel_values, image_grid_thw)`` of ``(B, 3, H, W)`` images in [0, 1] (differentiable)."""
        ip = self.image_processor
        return qwen2vl_preprocess(
            images, min_pixels=self.config.pixels, max_pixels=self.config.pixels, patch_size=ip.patch_size,
            temporal_patch_size=ip.temporal_patch_size, merge_size=ip.merge_size, mean=ip.image_mean, std=ip.image_std,
        )

    def tokenize(self, prompts: list[str], num_image_tokens: int) -> dict[str, Tensor]:
        texts = [hpsv3_chat_text(p, num_image_tokens) for p in prompts]
        tok = self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def mu_sigma(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``(B, 2)`` raw ``(mu, sigma)`` on ``images``' device, in micro-batches; keeps a graph only when grad is
        on and asked for."""
        track = torch.is_grad_enabled() and images.requires_grad
        device = self.model.rm_head[0].weight.device  # where the model is now
        ip = self.image_processor
        outs = []
        with torch.set_grad_enabled(track):
            for start in range(0, len(prompts), self.config.micro_batch_size):
                chunk = images[start : start + self.config.micro_batch_size].to(device)
                pixel_values, grid = self.preprocess(chunk)
                n_tokens = int(grid[0, 1] * grid[0, 2]) // (ip.merge_size * ip.merge_size)
                tok = self.tokenize(prompts[start : start + chunk.shape[0]], n_tokens)
                outs.append(self.model(
                    tok["input_ids"].to(device), tok["attention_mask"].to(device), pixel_values, grid.to(device),
                    self.reward_token_id, self.image_token_id,
                ))
            return torch.cat(outs).to(images.device)

    def forward(self, batch: RewardInput) -> RewardOutput:
        images = reward_pixels(batch, self._decode)
        out = self.mu_sigma(images, batch.prompts)
        mu, sigma = out[:, 0], out[:, 1]
        scores = mu if self.config.normalize == "raw" else self._normalize(mu)
        return RewardOutput(scores=scores.float(), extras={"raw": mu.detach().float(), "sigma": sigma.detach().float()})
