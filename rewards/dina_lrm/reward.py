"""``dina-lrm``: the DiNa-LRM latent reward behind the common reward interface.

Recipe use::

    rewards.build("dina-lrm", pretrained="liuhuohuo/DiNa-LRM-SD35M-12layers",
                  base_model="stabilityai/stable-diffusion-3.5-medium", mode="renoise", u=0.4,
                  normalize="affine", shift=10.0, scale=10.0)

and, for reward training, a fresh model: ``DiNaLRMReward(config=DiNaLRMConfig(...), base_model=...)``.

Nothing heavy happens at construction (only ``config.json`` is read). The backbone comes either from
:meth:`attach_generator` -- sharing the generator's blocks as a second peft adapter when the generator's
transformer is the reward's base model -- or, at first use, from ``base_model`` loaded by the reward itself
(by default the generator the checkpoint's ``config.json`` names as ``backbone_model_id``: SD3.5-M for the
release, the recipe's ``model.pretrained`` for a checkpoint rlkit trained).

Modes: ``renoise`` adds noise at level ``u`` to the (clean or predicted-clean) latents and scores them;
``state`` scores an intermediate state at its own sigma (``RewardInput.sigmas``), no re-noising;
``ensemble`` scores one shared noise at several levels with one head pass. Noise comes only from
``RewardInput.generator``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from rewards.base import Reward, RewardInput, RewardOutput, TextConditioning
from rewards.dina_lrm.checkpoint import load_dina_lrm, read_config, resolve_folder, save_dina_lrm
from rewards.dina_lrm.config import DiNaLRMConfig
from rewards.dina_lrm.model import TIMESTEP_SCALE, DiNaLRM
from rlkit.confload import missing_local_path, resolve_package_path

Mode = Literal["renoise", "state", "ensemble"]
MODES = ("renoise", "state", "ensemble")
NORMALIZATIONS = ("raw", "affine")
SHARE_POLICIES = ("auto", "always", "never")
FULL_FINETUNE_POLICIES = ("refuse", "copy")


@dataclass
class DiNaLRMRewardOptions:
    """How the reward is used (the architecture lives in :class:`DiNaLRMConfig`)."""

    mode: Mode = "renoise"
    u: float = 0.4  # re-noising level of `renoise` (0.4 for generated latents, 0.1 for clean images)
    levels: tuple[float, ...] = (0.2, 0.5, 0.7)  # noise ensemble levels
    normalize: Literal["raw", "affine"] = "raw"  # affine: (raw + shift) / scale
    shift: float = 0.0
    scale: float = 1.0
    snap_levels: bool = True  # move u / levels to the scheduler's sigma table, as the release does
    share_backbone: Literal["auto", "always", "never"] | bool = "auto"  # auto (true): share when base_model is
    # the generator's (or not given); always: share with any attached generator; never (false): own copy
    on_full_finetune: Literal["refuse", "copy"] = "refuse"  # generator trained without LoRA: refuse or frozen copy
    # when the reward loads its own base model; None: the attached generator's (as a reward sharing its blocks runs
    # in), float32 without one
    dtype: str | None = None
    device: str = "cpu"
    max_sequence_length: int | None = None  # T5 tokens for prompts the reward encodes (None: the config's)
    revision: str | None = None

    def __post_init__(self) -> None:
        self.levels = tuple(float(v) for v in self.levels)
        if isinstance(self.share_backbone, bool):  # recipes may write `share_backbone: true`
            self.share_backbone = "auto" if self.share_backbone else "never"
        problems = []
        if self.mode not in MODES:
            problems.append(("mode", f"must be one of {MODES}, got {self.mode!r}"))
        if not 0 <= self.u <= 1:
            problems.append(("u", f"must lie in [0, 1], got {self.u}"))
        if not self.levels or any(not 0 <= v <= 1 for v in self.levels):
            problems.append(("levels", f"must be a non-empty list of levels in [0, 1], got {list(self.levels)}"))
        if self.normalize not in NORMALIZATIONS:
            problems.append(("normalize", f"must be one of {NORMALIZATIONS}, got {self.normalize!r}"))
        if self.scale == 0:
            problems.append(("scale", "must be non-zero"))
        if self.share_backbone not in SHARE_POLICIES:
            problems.append(("share_backbone", f"must be one of {SHARE_POLICIES}, got {self.share_backbone!r}"))
        if self.on_full_finetune not in FULL_FINETUNE_POLICIES:
            problems.append(("on_full_finetune",
                             f"must be one of {FULL_FINETUNE_POLICIES}, got {self.on_full_finetune!r}"))
        if self.max_sequence_length is not None and self.max_sequence_length <= 0:
            problems.append(("max_sequence_length", f"must be > 0, got {self.max_sequence_length}"))
        if problems:
            raise ValueError("; ".join(f"dina-lrm option {k!r}: {v}" for k, v in problems))


def _source_key(source: str | None) -> str | None:
    if not source:
        return None
    local = Path(str(source)).expanduser()
    return str(local.resolve()) if local.exists() else str(source)


def _generator_source(generator: Any) -> str | None:
    pipeline = getattr(generator, "pipeline", None)
    name = getattr(pipeline, "name_or_path", None) or getattr(getattr(pipeline, "config", None), "_name_or_path", None)
    return _source_key(name)


def _is_fully_finetuned(transformer: torch.nn.Module, num_blocks: int) -> bool:
    """Any non-adapter weight of the embedders or the first blocks is being trained."""
    prefixes = ("pos_embed.", "time_text_embed.", "context_embedder.") + tuple(
        f"transformer_blocks.{i}." for i in range(num_blocks))
    return any(p.requires_grad and n.startswith(prefixes) and ".lora_" not in n
               for n, p in transformer.named_parameters())


class DiNaLRMReward(Reward):
    """DiNa-LRM as a reward: latent space, noise-aware, differentiable with respect to the latents."""

    space = "latent"
    noise_aware = True
    differentiable = True
    args_class = DiNaLRMRewardOptions

    def __init__(
        self,
        pretrained: str | Path | None = None,
        base_model: str | Path | None = None,
        config: DiNaLRMConfig | dict | None = None,
        **options: Any,
    ):
        super().__init__()
        known = {f.name for f in fields(DiNaLRMRewardOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"dina-lrm: unknown option(s) {unknown}; known: pretrained, base_model, config, "
                            f"{', '.join(sorted(known))}")
        self.options = DiNaLRMRewardOptions(**options)
        if (pretrained is None) == (config is None):
            raise ValueError("dina-lrm: give exactly one of `pretrained` (a checkpoint folder or hub id) and "
                             "`config` (a fresh, untrained model)")
        self.pretrained = str(pretrained) if pretrained is not None else None
        self.base_model = resolve_package_path(str(base_model)) if base_model is not None else None
        if self.pretrained is not None:
            self.arch = read_config(resolve_folder(self.pretrained, self.options.revision))
        else:
            self.arch = config if isinstance(config, DiNaLRMConfig) else DiNaLRMConfig.from_dict(dict(config))
        self.max_sequence_length = self.options.max_sequence_length or self.arch.max_sequence_length
        self.model: DiNaLRM | None = None
        self._text_encoder: Any = None  # an SD3Generator used only for its text encoders
        # where (and in which dtype) an own backbone materialises: the options', or what `.to()` asked for
        # before there was a model to move
        self._load_device = torch.device(self.options.device)
        self._load_dtype: torch.dtype | str | None = self.options.dtype

    # -- placement -------------------------------------------------------------------------------------
    def to(self, *args: Any, **kwargs: Any) -> "DiNaLRMReward":
        """``nn.Module.to``; before the model exists (it materialises at first use) the device and dtype are
        remembered, so the backbone the reward loads itself is built there."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if self.model is None:
            self._load_device = torch.device(device) if device is not None else self._load_device
            self._load_dtype = dtype if dtype is not None else self._load_dtype
        return super().to(*args, **kwargs)

    def place(self, device: torch.device | str) -> "DiNaLRMReward":
        """A reward sharing the policy's blocks stays with the policy; otherwise as :meth:`Reward.place`."""
        if self.is_shared:
            return self
        return super().place(device)

    @property
    def device(self) -> torch.device:
        """Where the reward computes: its model's device, or where the model will materialise."""
        return self.model.grid.device if self.model is not None else self._load_device

    # -- backbone --------------------------------------------------------------------------------------
    def _build_on(self, transformer: torch.nn.Module, share: bool, copy_blocks: bool) -> None:
        if self.pretrained is not None:
            self.model = load_dina_lrm(self.pretrained, transformer, share=share, copy_blocks=copy_blocks,
                                       revision=self.options.revision)
        else:
            self.model = DiNaLRM.build(self.arch, transformer, share=share, copy_blocks=copy_blocks)

    def _use_text_encoders_of(self, generator: Any) -> None:
        from rlkit.models.sd3 import SD3Generator

        if getattr(generator.pipeline, "text_encoder", None) is not None:
            self._text_encoder = SD3Generator(pipeline=generator.pipeline, max_sequence_length=self.max_sequence_length,
                                              cache_limit=generator.cache_limit)

    def attach_generator(self, generator: Any) -> None:
        """Shares the generator's blocks (a second adapter ``rm_lora``) when it is the reward's base model.

        Call it after the policy is set up (LoRA added, or the transformer unfrozen for full fine-tuning): a
        generator whose base weights require grad at this point is refused or copied (``on_full_finetune``).
        """
        if self._text_encoder is None:
            self._use_text_encoders_of(generator)
        if self.model is not None:
            return
        opts = self.options
        same = self.base_model is None or _source_key(self.base_model) == _generator_source(generator)
        if opts.share_backbone == "never" or (opts.share_backbone == "auto" and not same):
            if self._load_dtype is None:  # a bf16 policy's reward copy in bf16, not twice its size in fp32
                self._load_dtype = next(generator.transformer.parameters()).dtype
            return  # the reward loads its own base model at first use
        transformer = generator.transformer
        if self.arch.save_mode == "full":
            self._build_on(transformer, share=False, copy_blocks=True)  # its own trained backbone weights
            return
        if _is_fully_finetuned(transformer, self.arch.num_transformer_layers):
            if opts.on_full_finetune == "refuse":
                raise ValueError(
                    "dina-lrm: the generator's transformer is being fully fine-tuned (its base weights require grad), "
                    "so the reward cannot share its blocks. Set the reward option on_full_finetune='copy' for a "
                    "frozen copy of the first blocks, share_backbone='never' to load the base model separately, or "
                    "train the generator with LoRA")
            self._build_on(transformer, share=False, copy_blocks=True)
            self.model.set_trainable(lora=False, head=False, backbone=False)
            return
        self._build_on(transformer, share=True, copy_blocks=False)

    def _materialize(self) -> DiNaLRM:
        if self.model is not None:
            return self.model
        # without base_model: the generator the checkpoint names (the release's SD3.5-M; rlkit's trained ones
        # record theirs)
        base_model = self.base_model or resolve_package_path(self.arch.backbone_model_id)
        if not base_model:
            raise ValueError("dina-lrm: no backbone yet. Pass base_model=<SD3 folder or hub id> or call "
                             "attach_generator(generator) before scoring")
        from rlkit.models.sd3 import SD3Generator

        generator = SD3Generator.from_pretrained(base_model, dtype=self._load_dtype or "fp32",
                                                 device=self._load_device, max_sequence_length=self.max_sequence_length,
                                                 revision=self.options.revision)
        self._build_on(generator.transformer, share=False, copy_blocks=False)
        generator.transformer = None  # the reward keeps only its first blocks
        if self._text_encoder is None:
            self._use_text_encoders_of(generator)
        return self.model

    @property
    def is_shared(self) -> bool:
        return self.model is not None and self.model.is_shared

    # -- text ------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> TextConditioning:
        self._materialize()
        if self._text_encoder is None:
            raise ValueError("dina-lrm: RewardInput.text is missing and the reward has no text encoders (the "
                             "generator was loaded without them); pass the generator's TextConditioning")
        return self._text_encoder.encode_prompts(prompts)

    # -- scoring ---------------------------------------------------------------------------------------
    def _levels(self, values: Tensor) -> Tensor:
        return self._materialize().snap(values) if self.options.snap_levels else values

    def _noise(self, batch: RewardInput, latents: Tensor) -> Tensor:
        g = batch.generator
        if g is None:
            raise ValueError(f"dina-lrm mode {self.options.mode!r} draws noise: RewardInput.generator is required")
        if not isinstance(g, torch.Generator) and len(g) != latents.shape[0]:
            raise ValueError(f"dina-lrm: RewardInput.generator holds {len(g)} generators for {latents.shape[0]} "
                             "samples")
        from diffusers.utils.torch_utils import randn_tensor  # the sampler's rule: one generator, or one a sample

        return randn_tensor(latents.shape, generator=g, device=latents.device, dtype=torch.float32)

    def raw_scores(self, batch: RewardInput) -> Tensor:
        """Unnormalised scores (B,) float32, on the device of ``batch.latents``."""
        model = self._materialize()
        if batch.latents is None:
            raise ValueError("dina-lrm reads latents: RewardInput.latents is required")
        return self._raw_scores(model, batch, batch.latents.to(self.device)).to(batch.latents.device)

    def _raw_scores(self, model: DiNaLRM, batch: RewardInput, latents: Tensor) -> Tensor:
        """:meth:`raw_scores` with ``latents`` on the model's device."""
        text = batch.text if batch.text is not None else self.encode_prompts(batch.prompts)
        mode = self.options.mode
        if mode != "state" and batch.sigmas is not None and bool((batch.sigmas > 0).any()):
            raise ValueError(f"dina-lrm in mode {mode!r} scores clean latents (it noises them itself), but these "
                             f"are states at sigma up to {batch.sigmas.max().item():.3g}; set mode: state to score "
                             "them at their own noise level")
        if mode == "state":
            return model.score(latents, batch.clean_sigmas().float(), text)
        if mode == "renoise":
            u = self._levels(torch.full((latents.shape[0],), self.options.u, device=latents.device))
            if not self.arch.add_noise:
                return model.score(latents, u, text)
            s = u.reshape(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
            return model.score((1 - s) * latents + s * self._noise(batch, latents).to(latents.dtype), u, text)
        levels = self._levels(torch.tensor(self.options.levels, device=latents.device))
        if not self.arch.add_noise:  # the release then scores the clean latents under every level's embedding
            timesteps = [torch.full((latents.shape[0],), TIMESTEP_SCALE * float(v), device=latents.device)
                         for v in levels]
            return model.forward_ensemble([latents] * len(levels), timesteps, text)
        return model.score_ensemble(latents, self._noise(batch, latents).to(latents.dtype), levels, text)

    def score(self, latents: Tensor, sigmas: Tensor | float, text: TextConditioning) -> Tensor:
        """Raw scores of ``latents`` as given at noise level ``sigmas`` (see :meth:`DiNaLRM.score`)."""
        return self._materialize().score(latents, sigmas, text)

    def score_ensemble(self, x0: Tensor, noise: Tensor, levels, text: TextConditioning) -> Tensor:
        """Raw noise-ensemble scores (see :meth:`DiNaLRM.score_ensemble`); ``levels`` are used as given."""
        return self._materialize().score_ensemble(x0, noise, levels, text)

    def normalize(self, raw: Tensor) -> Tensor:
        if self.options.normalize == "affine":
            return (raw + self.options.shift) / self.options.scale
        return raw

    @property
    def scores_noisy_states(self) -> bool:
        return self.options.mode == "state"

    @classmethod
    def args_problems(cls, args: dict[str, Any]) -> Iterator[tuple[str, str]]:
        yield from super().args_problems(args)
        if (args.get("pretrained") is None) == (args.get("config") is None):
            yield "", "give exactly one of `pretrained` (a checkpoint folder or hub id) and `config` (a fresh model)"
        for key in ("pretrained", "base_model"):
            if isinstance(args.get(key), str) and missing_local_path(args[key]):
                yield key, f"no such folder: {args[key]} (expected a local folder or a hub id)"

    @classmethod
    def scores_noisy_states_with(cls, args: dict[str, Any]) -> bool:
        return args.get("mode", DiNaLRMRewardOptions.mode) == "state"

    def forward(self, batch: RewardInput) -> RewardOutput:
        raw = self.raw_scores(batch)
        return RewardOutput(scores=self.normalize(raw), extras={"raw": raw.detach()})

    # -- training / saving -----------------------------------------------------------------------------
    def set_trainable(self, mode: Literal["lora_head", "head", "full", "none"]) -> list[torch.nn.Parameter]:
        """Marks what reward-model training updates and returns those parameters (for the optimiser).

        ``lora_head``: the release's default; ``head``: frozen backbone; ``full``: backbone weights too (an own,
        unshared backbone, saved as ``full_model.pt``, so only for a config whose save mode is ``full``); ``none``:
        frozen (scoring).
        """
        model = self._materialize()
        flags = {"lora_head": (True, True, False), "head": (False, True, False), "full": (True, True, True),
                 "none": (False, False, False)}
        if mode not in flags:
            raise ValueError(f"dina-lrm set_trainable: mode must be one of {sorted(flags)}, got {mode!r}")
        if mode == "lora_head" and not model.has_lora:
            raise ValueError("dina-lrm set_trainable('lora_head'): this model has no LoRA (config.use_lora=False "
                             "or freeze_backbone=True)")
        if mode == "full" and model.config.save_mode != "full":
            raise ValueError(f"dina-lrm set_trainable('full'): this model saves in mode {model.config.save_mode!r}, "
                             "which would not write the trained backbone weights; build it with use_lora=False, "
                             "freeze_backbone=False")
        lora, head, backbone = flags[mode]
        model.set_trainable(lora=lora, head=head, backbone=backbone)
        candidates = model.added_parameters() + (list(model.parameters()) if backbone else [])
        return list({id(p): p for p in candidates if p.requires_grad}.values())

    def save_pretrained(self, folder: str | Path) -> Path:
        """The release's layout (``config.json`` + ``checkpoint/``)."""
        return save_dina_lrm(self._materialize(), folder)
