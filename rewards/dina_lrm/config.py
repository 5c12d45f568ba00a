"""DiNa-LRM architecture settings and their round trip to the official ``config.json``.

The official release stores its whole training config (``model``, ``training``, ``data``, ... sections,
an OmegaConf dump of ``config/sd3m/thurstone-12layer.yaml``). Only the ``model`` section and
``training.add_noise`` decide how the checkpoint scores; :func:`DiNaLRMConfig.from_official` reads those,
:func:`DiNaLRMConfig.to_official` writes a file the official ``DRMInferencer`` can read back.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from rlkit.models.lora import SD3_ATTN_TARGETS

LORA_INIT_NAMES = ("gaussian", "default", "random")

RLKIT_ONLY_FIELDS = ("max_sequence_length", "grid_num_train_timesteps", "grid_shift", "feature_divisor", "ffn_mult")
# Keys of the official ``model`` section that do not change how a checkpoint scores.
OFFICIAL_IGNORED_MODEL_KEYS = ("model_type", "use_ema", "ema_decay", "use_t_embed")


class DiNaLRMConfigError(ValueError):
    """A DiNa-LRM config field is invalid; the message names the field."""


@dataclass
class DiNaLRMConfig:
    """Every width and count of the reward model. Defaults are the SD3.5-M release (12 blocks)."""

    num_transformer_layers: int = 12  # first N blocks of the base transformer kept as backbone
    visual_head_idx: tuple[int, ...] = (4, 8, 12)  # tapped block outputs, 1-indexed (0 = embedder output)
    text_head_idx: tuple[int, ...] = (4, 8, 12)
    use_text_features: bool = True  # release flag: only decides the LoRA exclusion below; the head reads every
    # text tap listed
    freeze_backbone: bool = False  # frozen backbone, no LoRA: checkpoint is the head only
    use_lora: bool = True  # False and not frozen: checkpoint is full_model.pt
    lora_r: int = 64
    lora_alpha: float = 128.0
    lora_init: str = "gaussian"
    lora_targets: tuple[str, ...] = tuple(SD3_ATTN_TARGETS)
    head_width: int = -1  # -1: the transformer's inner dim
    out_dim: int = 1
    num_queries: int = 4
    num_attn_heads: int = 8
    dropout: float = 0.0
    use_proj_in: bool = False  # FiLM adapters project the tapped tokens first
    feature_divisor: int = 4  # each FiLM adapter outputs head_width // feature_divisor features
    ffn_mult: int = 4  # hidden width of the head's FFN = ffn_mult * head_width
    use_logistic: bool = False  # the release's optional logistic output normalisation (off in the release)
    add_noise: bool = True  # training.add_noise of the release: False scores latents without re-noising
    max_sequence_length: int = 128  # T5 tokens when the reward encodes prompts itself
    grid_num_train_timesteps: int = 1000  # noise levels snap to this scheduler table (as the release does)
    grid_shift: float = 3.0
    backbone_model_id: str = "stabilityai/stable-diffusion-3.5-medium"
    extra: dict[str, Any] = field(default_factory=dict)  # the rest of an official config.json, kept verbatim

    def __post_init__(self) -> None:
        self.visual_head_idx = tuple(int(i) for i in self.visual_head_idx)
        self.text_head_idx = tuple(int(i) for i in self.text_head_idx)
        self.lora_targets = tuple(self.lora_targets)
        problems = list(self._problems())
        if problems:
            raise DiNaLRMConfigError("; ".join(f"DiNaLRMConfig.{k}: {v}" for k, v in problems))

    def _problems(self):
        n = self.num_transformer_layers
        if n <= 0:
            yield "num_transformer_layers", f"must be > 0, got {n}"
        if not self.visual_head_idx:
            yield "visual_head_idx", "must tap at least one block"
        for name in ("visual_head_idx", "text_head_idx"):
            idx = getattr(self, name)
            if any(i < 0 or i > n for i in idx):
                yield name, f"taps must lie in [0, num_transformer_layers={n}], got {list(idx)}"
            if list(idx) != sorted(set(idx)):
                yield name, f"taps must be strictly increasing, got {list(idx)}"
        for name in ("lora_r", "num_queries", "num_attn_heads", "out_dim", "grid_num_train_timesteps",
                     "max_sequence_length", "feature_divisor", "ffn_mult"):
            if getattr(self, name) <= 0:
                yield name, f"must be > 0, got {getattr(self, name)}"
        if self.lora_alpha <= 0:
            yield "lora_alpha", f"must be > 0, got {self.lora_alpha}"
        if self.lora_init not in LORA_INIT_NAMES:
            yield "lora_init", f"must be one of {LORA_INIT_NAMES}, got {self.lora_init!r}"
        if not 0 <= self.dropout < 1:
            yield "dropout", f"must lie in [0, 1), got {self.dropout}"
        if self.head_width != -1 and self.head_width <= 0:
            yield "head_width", f"must be > 0 or -1 (the transformer width), got {self.head_width}"
        if self.head_width > 0 and self.head_width % self.num_attn_heads:
            yield "head_width", f"{self.head_width} is not divisible by num_attn_heads={self.num_attn_heads}"

    # -- derived ------------------------------------------------------------------------------------------
    @property
    def save_mode(self) -> Literal["lora", "full", "head"]:
        """Which files a checkpoint holds, following the release's three save modes."""
        if self.use_lora and not self.freeze_backbone:
            return "lora"
        if not self.freeze_backbone:
            return "full"
        return "head"

    @property
    def excluded_lora_modules(self) -> tuple[str, ...]:
        """The release leaves the last block's text projections without LoRA unless a text tap reads it."""
        if self.use_text_features and self.text_head_idx and self.text_head_idx[-1] == self.num_transformer_layers:
            return ()
        last = self.num_transformer_layers - 1
        return tuple(f"transformer_blocks.{last}.attn.{m}" for m in ("add_q_proj", "add_k_proj", "add_v_proj",
                                                                      "to_add_out"))

    def head_width_for(self, token_dim: int) -> int:
        width = token_dim if self.head_width == -1 else self.head_width
        if width % self.num_attn_heads:
            raise DiNaLRMConfigError(
                f"DiNaLRMConfig.head_width: {width} is not divisible by num_attn_heads={self.num_attn_heads}")
        return width

    # -- official config.json ---------------------------------------------------------------------------
    @classmethod
    def from_official(cls, data: dict[str, Any], source: str = "config.json") -> "DiNaLRMConfig":
        """Reads an official ``config.json`` (or one written by :meth:`to_official`)."""
        if "model" not in data or not isinstance(data["model"], dict):
            raise DiNaLRMConfigError(f"{source}: no 'model' section; is this a DiNa-LRM config.json?")
        model = dict(data["model"])
        lora = dict(model.pop("lora_config", None) or {})
        head = dict(model.pop("reward_head", None) or {})
        rlkit_keys = dict(model.pop("rlkit", None) or {})
        kwargs: dict[str, Any] = {}
        simple = ("num_transformer_layers", "visual_head_idx", "text_head_idx", "use_text_features",
                  "freeze_backbone", "use_lora", "use_logistic", "backbone_model_id")
        for key in simple:
            if key in model:
                kwargs[key] = model.pop(key)
        if "r" in lora:
            kwargs["lora_r"] = lora.pop("r")
        if "lora_alpha" in lora:
            kwargs["lora_alpha"] = lora.pop("lora_alpha")
        if "init_lora_weights" in lora:
            init = lora.pop("init_lora_weights")
            kwargs["lora_init"] = {True: "default", False: "random"}.get(init, init)
        if "target_modules" in lora:
            kwargs["lora_targets"] = tuple(lora.pop("target_modules"))
        head_map = {"width": "head_width", "out_dim": "out_dim", "num_queries": "num_queries",
                    "num_attn_heads": "num_attn_heads", "dropout": "dropout", "use_proj_in": "use_proj_in"}
        for key, ours in head_map.items():
            if key in head:
                kwargs[ours] = head.pop(key)
        known = {f.name for f in fields(cls)}
        for key, value in rlkit_keys.items():
            if key not in known or key == "extra":
                raise DiNaLRMConfigError(f"{source}: model.rlkit.{key} is not a DiNaLRMConfig field")
            kwargs[key] = value
        for key in OFFICIAL_IGNORED_MODEL_KEYS:
            model.pop(key, None)
        leftovers = [f"model.{k}" for k in model] + [f"model.lora_config.{k}" for k in lora] + [
            f"model.reward_head.{k}" for k in head]
        if leftovers:
            warnings.warn(f"{source}: ignoring unknown DiNa-LRM keys {leftovers}", stacklevel=2)
        training = data.get("training") or {}
        if "add_noise" in training and "add_noise" not in kwargs:
            kwargs["add_noise"] = bool(training["add_noise"])
        kwargs["extra"] = {k: v for k, v in data.items() if k != "model"}
        return cls(**kwargs)

    def to_official(self) -> dict[str, Any]:
        """The ``config.json`` layout of the release (its ``training``/``data``... sections kept from ``extra``)."""
        ours = asdict(self)
        model = {
            "model_type": "thurstone",
            "backbone_model_id": self.backbone_model_id,
            "num_transformer_layers": self.num_transformer_layers,
            "freeze_backbone": self.freeze_backbone,
            "use_lora": self.use_lora,
            "use_text_features": self.use_text_features,
            "lora_config": {"r": self.lora_r, "lora_alpha": self.lora_alpha,
                            "init_lora_weights": {"default": True, "random": False}.get(self.lora_init,
                                                                                        self.lora_init),
                            "target_modules": list(self.lora_targets)},
            "use_logistic": self.use_logistic,
            "visual_head_idx": list(self.visual_head_idx),
            "text_head_idx": list(self.text_head_idx),
            "use_t_embed": True,
            "reward_head": {"use_proj_in": self.use_proj_in, "width": self.head_width, "out_dim": self.out_dim,
                            "num_queries": self.num_queries, "num_attn_heads": self.num_attn_heads,
                            "dropout": self.dropout},
            "rlkit": {k: ours[k] for k in RLKIT_ONLY_FIELDS},  # fields the release does not have
        }
        out = dict(self.extra)
        training = dict(out.get("training") or {})
        training["add_noise"] = self.add_noise
        out["training"] = training
        return {"model": model, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiNaLRMConfig":
        """Flat field dict (as in a recipe's ``reward_model.model``); unknown keys are errors naming the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DiNaLRMConfigError(f"DiNaLRMConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)
