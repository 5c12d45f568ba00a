"""The one reward interface shared by every reward, latent or pixel.

Trainers fill a :class:`RewardInput` and read back :class:`RewardOutput.scores`; they never know which
reward they call. Tensor conventions (SD3 / rectified flow) are those of ``DESIGN.md``:
``latents`` are what the transformer reads, ``x_sigma = (1 - sigma) * x0 + sigma * eps``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import Tensor, nn


@dataclass
class TextConditioning:
    """Prompt embeddings in the SD3 layout, as the generator's text encoders produce them."""

    encoder_hidden_states: Tensor  # (B, L, joint_attention_dim)
    pooled_projections: Tensor  # (B, pooled_projection_dim)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextConditioning":
        return TextConditioning(
            self.encoder_hidden_states.to(device=device, dtype=dtype),
            self.pooled_projections.to(device=device, dtype=dtype),
        )

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def index(self, idx: Tensor | slice | list[int]) -> "TextConditioning":
        return TextConditioning(self.encoder_hidden_states[idx], self.pooled_projections[idx])

    def repeat_interleave(self, k: int) -> "TextConditioning":
        return TextConditioning(
            self.encoder_hidden_states.repeat_interleave(k, dim=0),
            self.pooled_projections.repeat_interleave(k, dim=0),
        )

    @staticmethod
    def cat(items: list["TextConditioning"]) -> "TextConditioning":
        return TextConditioning(
            torch.cat([t.encoder_hidden_states for t in items]),
            torch.cat([t.pooled_projections for t in items]),
        )


class MemoDecode:
    """Wraps a ``latents -> images`` decoder so one batch is decoded at most once.

    Several pixel rewards in one call share the decode; ``calls`` counts real decodes (tests and
    benchmarks read it).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn = fn
        self.calls = 0
        self._key: tuple[int, int] | None = None
        self._images: Tensor | None = None

    def __call__(self, latents: Tensor) -> Tensor:
        key = (id(latents), latents._version)
        if self._key != key or self._images is None:
            self._images = self.fn(latents)
            self._key = key
            self.calls += 1
        return self._images


@dataclass
class RewardInput:
    prompts: list[str]
    latents: Tensor | None = None  # (B, C, h, w) in the transformer's latent space
    sigmas: Tensor | None = None  # (B,) noise level of `latents`; 0 means clean
    text: TextConditioning | None = None  # cached prompt embeddings of the generator, when shared
    decode: Callable[[Tensor], Tensor] | None = None  # latents -> images in [0, 1], differentiable
    images: Tensor | None = None  # (B, 3, H, W) in [0, 1], when already decoded
    # stochastic rewards (DiNa-LRM noise) draw from this; a list holds one per sample (its noise then does not depend
    # on the batch it is scored in: rlkit's evaluation)
    generator: torch.Generator | list[torch.Generator] | None = None

    def __post_init__(self) -> None:
        n = len(self.prompts)
        for name in ("latents", "images", "sigmas"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"RewardInput.{name} has batch {value.shape[0]}, but there are {n} prompts")
        if self.text is not None and len(self.text) != n:
            raise ValueError(f"RewardInput.text has batch {len(self.text)}, but there are {n} prompts")

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def device(self) -> torch.device | None:
        """Where the batch's tensors live (the latents', else the images'): rewards return their scores there."""
        x = self.latents if self.latents is not None else self.images
        return None if x is None else x.device

    def clean_sigmas(self) -> Tensor:
        """``sigmas`` or zeros when the latents are clean."""
        if self.latents is None:
            raise ValueError("RewardInput.latents is required here")
        if self.sigmas is None:
            return torch.zeros(self.latents.shape[0], device=self.latents.device, dtype=torch.float32)
        return self.sigmas

    def pixels(self) -> Tensor:
        """Images in [0, 1]: the given ones, or the (memoised) decode of the latents."""
        if self.images is not None:
            return self.images
        if self.latents is None or self.decode is None:
            raise ValueError(
                "this reward reads pixels: RewardInput needs `images`, or `latents` together with a `decode` function"
            )
        return self.decode(self.latents)


@dataclass
class RewardOutput:
    scores: Tensor  # (B,) float32, higher is better, after the recipe's normalisation
    extras: dict[str, Tensor] = field(default_factory=dict)  # raw scores, components; logged by name


class Reward(nn.Module):
    """Base class of every reward. Subclasses set the three class variables and ``forward``."""

    space: ClassVar[Literal["latent", "pixel"]]
    noise_aware: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True
    pinned_device: str | torch.device | None = None  # a device its args named (set by ``rewards.build``)
    # the dataclass whose fields a constructor's ``**kwargs`` take: ``rewards.build`` and recipe validation check
    # args against it, so that a misspelt or stale arg is reported before any model loads
    args_class: ClassVar[type | None] = None

    def place(self, device: torch.device | str) -> "Reward":
        """Puts the reward where the trainer computes, ``device``, unless its args named a device of its own
        (:attr:`pinned_device`): then it stays there and returns its scores on the input's device.

        Rewards whose weights belong to someone else (a backbone shared with the policy) override this.
        """
        if self.pinned_device is None:
            self.to(device)
        return self

    @property
    def scores_noisy_states(self) -> bool:
        """Whether a call whose ``RewardInput.sigmas`` are above 0 scores those states as they are, at their own
        noise level: what ``refl.reward_at: state`` and ``flow_grpo.reward_at: window_end`` need. A noise-aware
        reward can be set to do otherwise (DiNa-LRM's ``renoise`` mode noises clean latents itself)."""
        return self.noise_aware

    @classmethod
    def args_problems(cls, args: dict[str, Any]) -> Iterator[tuple[str, str]]:
        """``(arg, message)`` for every problem of recipe ``args`` the reward can tell without loading a weight:
        their types and values, as :attr:`args_class` checks them (recipe validation; the registry has checked
        their names)."""
        if cls.args_class is None:
            return
        from rlkit.confload import ConfigError, build

        names = {f.name for f in fields(cls.args_class)}
        try:
            build(cls.args_class, {k: v for k, v in args.items() if k in names})
        except ConfigError as exc:
            for problem in exc.problems:
                yield problem.key, problem.message

    @classmethod
    def scores_noisy_states_with(cls, args: dict[str, Any]) -> bool:
        """:attr:`scores_noisy_states` of the reward these recipe ``args`` would build, told without building it
        (recipe validation)."""
        return cls.noise_aware

    @contextlib.contextmanager
    def held_out(self) -> Iterator[None]:
        """Scoring for evaluation: a reward with state that training calls update (running normalisation
        statistics) leaves it as it is inside this context. Nothing to do for a stateless reward."""
        yield

    def running_state(self) -> dict[str, Tensor]:
        """The state that training calls update (see :meth:`held_out`), for checkpoints: a resumed run goes on
        with it. Empty for a stateless reward; never the model's weights."""
        return {}

    def load_running_state(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no running state, but the checkpoint holds {sorted(state)}")

    def forward(self, batch: RewardInput) -> RewardOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def attach_generator(self, generator: object) -> None:
        """Called by trainers with the loaded generator (``rlkit.models.SD3Generator``).

        Rewards that share the generator's backbone or text encoders override this; the default ignores it.
        """


Normalize = Callable[[Tensor], Tensor]


def affine_normalizer(shift: float = 0.0, scale: float = 1.0) -> Normalize:
    """``(raw + shift) / scale``, e.g. DiNa-LRM's ``(raw + 10) / 10``."""

    def fn(raw: Tensor) -> Tensor:
        return (raw + shift) / scale

    return fn
