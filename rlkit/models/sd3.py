"""The SD3 generator: ``StableDiffusion3Pipeline`` parts loaded from a hub id or a local folder.

One object holds the transformer, the flow-matching scheduler, the VAE and the text encoders, and offers
the few operations trainers and rewards need: prompt encoding with a cache, latent <-> image conversion
in the convention of ``DESIGN.md`` (``z = (vae_latent - shift) * scale``) and the sigma grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor

from rewards.base import TextConditioning
from rlkit.config import TEXT_CACHE_SIZE

if TYPE_CHECKING:
    from rlkit.config import DecodeConfig

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def dtype_argument(diffusers_version: str | None = None) -> str:
    """The name of ``from_pretrained``'s dtype argument: diffusers 0.40 renamed ``torch_dtype`` to ``dtype`` and
    warns on the old name, which older versions need."""
    major, minor = (int(part) for part in (diffusers_version or version("diffusers")).split(".")[:2])
    return "dtype" if (major, minor) >= (0, 40) else "torch_dtype"


class WeightsNotFoundError(FileNotFoundError):
    """Raised with a message that names what is missing and how to provide it."""


def explain_missing(source: str, exc: BaseException, what: str = "model") -> WeightsNotFoundError:
    """Turns a hub/IO error into one readable sentence (no traceback wall)."""
    local = Path(source).expanduser()
    if local.exists():
        hint = f"the folder {str(local)!r} exists but is not a complete {what} folder ({type(exc).__name__}: {exc})"
    elif source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source:  # a path, not org/name
        hint = f"there is no folder {str(local)!r}"
    else:
        hint = (
            f"{source!r} is neither a local folder nor a {what} in the Hugging Face cache, and it could not be "
            f"downloaded ({type(exc).__name__}). Provide a local folder path, or download it once with "
            f"`hf download {source}` (or set HF_HOME to a cache that holds it)"
        )
    return WeightsNotFoundError(f"cannot load {what} {source!r}: {hint}")


def vae_scale_factor(block_out_channels: Sequence[int]) -> int:
    """How many pixels one latent spans per side in a diffusers ``AutoencoderKL``: each block after the first halves
    the side."""
    return 2 ** (len(block_out_channels) - 1)


@dataclass
class SD3Generator:
    """The parts of an SD3 pipeline that rlkit trains and samples with."""

    pipeline: Any  # diffusers.StableDiffusion3Pipeline (owns the modules below)
    max_sequence_length: int = 77
    cache_limit: int | None = TEXT_CACHE_SIZE  # distinct prompts whose embeddings stay in memory (None: all)
    decode_checkpointing: bool = False  # see configure_decode
    _cache: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        dtype: str | torch.dtype = "fp32",
        device: str | torch.device = "cpu",
        max_sequence_length: int = 77,
        revision: str | None = None,
        load_text_encoders: bool = True,
    ) -> "SD3Generator":
        from diffusers import StableDiffusion3Pipeline

        kwargs: dict[str, Any] = {dtype_argument(): resolve_dtype(dtype)}
        if revision:
            kwargs["revision"] = revision
        if not load_text_encoders:
            kwargs.update(text_encoder=None, text_encoder_2=None, text_encoder_3=None,
                          tokenizer=None, tokenizer_2=None, tokenizer_3=None)
        from safetensors import SafetensorError

        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(str(source), **kwargs)
        except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a weights file cut short
            raise explain_missing(str(source), exc, "SD3 pipeline") from None
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if module is not None:
                module.requires_grad_(False)
        return cls(pipeline=pipe, max_sequence_length=max_sequence_length)

    # -- parts ---------------------------------------------------------------------------------------
    @property
    def transformer(self):
        return self.pipeline.transformer

    @transformer.setter
    def transformer(self, module) -> None:
        self.pipeline.transformer = module

    @property
    def scheduler(self):
        return self.pipeline.scheduler

    @property
    def vae(self):
        return self.pipeline.vae

    @property
    def device(self) -> torch.device:
        return self.pipeline.device  # its first module's, whichever of them are loaded

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae.config.block_out_channels)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        s = resolution // self.vae_scale_factor
        return (self.latent_channels, s, s)

    # -- text ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextConditioning:
        """SD3 prompt embeddings (CLIP-L + CLIP-G + T5), cached per prompt string (the first ``cache_limit``).

        Each new prompt is encoded on its own: batched encoders differ in the last bits with the batch's
        make-up, and a prompt's embedding must not depend on which prompts happened to be encoded with it
        (a resumed run would otherwise drift from an uninterrupted one).
        """
        fresh: dict[str, tuple[Tensor, Tensor]] = {}
        for p in dict.fromkeys(prompts):
            if p in self._cache:
                continue
            if self.pipeline.text_encoder is None:
                raise ValueError("this generator was loaded without text encoders; cannot encode new prompts")
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=[p], prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
            full = self.cache_limit is not None and len(self._cache) >= self.cache_limit
            (fresh if full else self._cache)[p] = (embeds[0].detach(), pooled[0].detach())
        rows = [self._cache[p] if p in self._cache else fresh[p] for p in prompts]
        return TextConditioning(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))

    # -- latents <-> images --------------------------------------------------------------------------
    def configure_decode(self, config: DecodeConfig) -> None:
        """How :meth:`decode` runs from now on: diffusers' VAE slicing and tiling (VAE-wide settings), and whether
        a decode that carries gradient recomputes the decoder's activations in backward."""
        (self.vae.enable_slicing if config.slicing else self.vae.disable_slicing)()
        (self.vae.enable_tiling if config.tiling else self.vae.disable_tiling)()
        self.decode_checkpointing = config.gradient_checkpointing

    def decode(self, latents: Tensor) -> Tensor:
        """Transformer latents -> images in [0, 1]; differentiable when ``latents`` require grad."""
        if self.decode_checkpointing and torch.is_grad_enabled() and latents.requires_grad:
            return torch.utils.checkpoint.checkpoint(self._decode, latents, use_reentrant=False)
        return self._decode(latents)

    def _decode(self, latents: Tensor) -> Tensor:
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Images in [0, 1] -> transformer latents ``(vae_latent - shift) * scale`` (posterior mode by default)."""
        cfg = self.vae.config
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return ((z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).float()

    # -- sigma grid ----------------------------------------------------------------------------------
    def sigmas(self, num_steps: int, device: torch.device | str | None = None) -> Tensor:
        """The scheduler's shifted grid from 1 to 0: ``num_steps + 1`` values, last one 0."""
        self.scheduler.set_timesteps(num_steps, device=device or self.device)
        return self.scheduler.sigmas.clone().float()

    def velocity(self, latents: Tensor, sigmas: Tensor, text: TextConditioning, transformer=None) -> Tensor:
        """The transformer's velocity ``v = eps - x0`` at noise levels ``sigmas`` (B,)."""
        model = transformer if transformer is not None else self.transformer
        dtype = next(model.parameters()).dtype
        out = model(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=text.encoder_hidden_states.to(dtype),
            pooled_projections=text.pooled_projections.to(dtype),
            timestep=(sigmas * 1000).float(),  # as diffusers' pipeline: not rounded to bf16's grid (912 for 913.35)
            return_dict=False,
        )[0]
        return out.float()
