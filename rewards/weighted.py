"""A weighted mixture of registered rewards, itself a reward.

``rewards.build("weighted", components=[{"name": "pickscore", "weight": 1.0, "args": {...},
"normalize": "zscore"}, ...])``. Each component's score is normalised on its own (``none``, ``affine``
with ``shift``/``scale``, or a running z-score) before weighting, so rewards of different scales (HPSv3 is
unbounded, PickScore sits near 21) mix by stated rules. ``extras`` log every component's score before
and after normalisation, and the component's own extras (its raw scores), under ``<key>/...``. Held-out
evaluation puts z-scored components on one scale for a whole run: the statistics of the first evaluation
(:meth:`WeightedReward.held_out_total`), not the running ones, which follow training.

Pixel components share one decode: when the batch carries latents, the mixture wraps the decoder (the
batch's, or the attached generator's) in a :class:`~rewards.base.MemoDecode` for the call; a mixture
of latent-only rewards never decodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
from torch import Tensor, nn

from rewards.base import MemoDecode, Reward, RewardInput, RewardOutput

NORMALIZE_KINDS = ("none", "affine", "zscore")


@dataclass
class NormalizeSpec:
    """Per-component normalisation. ``affine``: ``(x + shift) / scale``. ``zscore``: ``(x - mean) / (std + eps)``
    with running statistics: cumulative over every batch seen when ``momentum`` is None, else an exponential
    moving average with that momentum. The statistics include the current batch; until they hold two scores and
    a variance above ``eps`` the scores are only centred (a first batch of one would otherwise be divided by
    ``eps``, its gradient with it). Scoring for evaluation (:meth:`rewards.base.Reward.held_out`) leaves them as
    they are. ``sync``: pool each batch's statistics over all processes (``torch.distributed``), so every rank
    normalises alike; every rank must then call the reward together."""

    kind: Literal["none", "affine", "zscore"] = "none"
    shift: float = 0.0
    scale: float = 1.0
    momentum: float | None = None
    eps: float = 1e-6
    sync: bool = False

    def __post_init__(self) -> None:
        if self.kind not in NORMALIZE_KINDS:
            raise ValueError(f"normalize.kind must be one of {NORMALIZE_KINDS}, got {self.kind!r}")
        if self.scale == 0:
            raise ValueError("normalize.scale must be non-zero")
        if self.momentum is not None and not 0 < self.momentum <= 1:
            raise ValueError(f"normalize.momentum must be in (0, 1], got {self.momentum}")
        if self.eps <= 0:
            raise ValueError(f"normalize.eps must be > 0, got {self.eps}")

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | "NormalizeSpec" | None) -> "NormalizeSpec":
        if value is None:
            return cls()
        if isinstance(value, NormalizeSpec):
            return value
        if isinstance(value, str):
            return cls(kind=value)  # type: ignore[arg-type]
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"normalize has unknown keys {sorted(unknown)}")
            return cls(**value)
        raise TypeError(f"normalize must be a string or a mapping, got {type(value).__name__}")


class ScoreNormalizer(nn.Module):
    """Applies a :class:`NormalizeSpec`; z-score statistics live in buffers, so they checkpoint with the model."""

    def __init__(self, spec: NormalizeSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))
        self.frozen = False  # evaluation: normalise with the statistics as they are

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        x = x.detach().to(torch.float64).flatten()
        moments = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum(),
                               (x * x).sum()])
        if self.spec.sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(moments)
        n = int(moments[0].item())
        if n == 0:
            return
        b_mean = (moments[1] / n).to(self.mean.device)
        b_var = (moments[2] / n - b_mean**2).clamp(min=0).to(self.mean.device)
        if self.count == 0:
            self.mean.copy_(b_mean)
            self.var.copy_(b_var)
        elif self.spec.momentum is None:  # exact pooled statistics (Chan et al.)
            total = self.count + n
            delta = b_mean - self.mean
            m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
            self.mean.add_(delta * n / total)
            self.var.copy_(m2 / total)
        else:
            m = self.spec.momentum
            self.mean.mul_(1 - m).add_(m * b_mean)
            self.var.mul_(1 - m).add_(m * b_var)
        self.count.add_(n)

    def forward(self, x: Tensor, reference: tuple[float, float] | None = None) -> Tensor:
        """``x`` normalised; a z-score by ``reference`` (mean, std) where given, else by the running statistics
        (updated with ``x`` unless frozen)."""
        spec = self.spec
        if spec.kind == "none":
            return x
        if spec.kind == "affine":
            return (x + spec.shift) / spec.scale
        if reference is not None:
            return self._zscore(x, *reference)
        if not self.frozen:
            self.update(x)
        if self.count < 2:  # no spread measured yet
            return x - self.mean.to(x.dtype)
        return self._zscore(x, self.mean.to(x.dtype), self.var.sqrt().to(x.dtype))

    def _zscore(self, x: Tensor, mean: Tensor | float, std: Tensor | float) -> Tensor:
        """Centred, and scaled once there is a spread above ``eps``."""
        centred = x - mean
        return centred if std <= self.spec.eps else centred / (std + self.spec.eps)


@dataclass
class ComponentSpec:
    """One component of the mixture, in the recipe's words (``RewardSpec`` plus ``normalize`` and ``key``)."""

    name: str
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)
    normalize: NormalizeSpec = field(default_factory=NormalizeSpec)
    key: str | None = None  # name in extras; defaults to `name` (made unique with #i)

    @classmethod
    def parse(cls, value: Mapping[str, Any] | Any, index: int) -> "ComponentSpec":
        if not isinstance(value, Mapping):  # e.g. rlkit.config.RewardSpec
            value = {f: getattr(value, f) for f in ("name", "weight", "args", "normalize", "key") if hasattr(value, f)}
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(value) - allowed
        if unknown:
            raise ValueError(
                f"weighted.components[{index}] has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
        if "name" not in value:
            raise ValueError(f"weighted.components[{index}] needs a 'name'")
        try:
            normalize = NormalizeSpec.parse(value.get("normalize"))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"weighted.components[{index}].{exc}") from None
        args = dict(value.get("args") or {})
        return cls(name=value["name"], weight=float(value.get("weight", 1.0)), args=args, normalize=normalize,
                   key=value.get("key"))


class WeightedReward(Reward):
    """``sum_i w_i * normalize_i(r_i)``; ``space``/``noise_aware``/``differentiable`` follow the components."""

    space = "pixel"
    noise_aware = False
    differentiable = True

    @classmethod
    def args_problems(cls, args: dict[str, Any]) -> Iterator[tuple[str, str]]:
        """Each component checked as a recipe's own reward entries are (:meth:`rlkit.config.RewardSpec.check`)."""
        from rlkit.config import RewardSpec

        components = args.get("components")
        if not isinstance(components, (list, tuple)) or not components:
            yield "components", f"must list at least one reward, got {components!r}"
            return
        for i, value in enumerate(components):
            try:
                spec = ComponentSpec.parse(value, i)
            except (TypeError, ValueError) as exc:
                yield f"components.{i}", str(exc)
                continue
            for key, message in RewardSpec(spec.name, weight=spec.weight, args=spec.args).check():
                yield f"components.{i}.{key}", message

    def __init__(self, components: list[Mapping[str, Any]], rewards_by_key: Mapping[str, Reward] | None = None):
        """``components``: specs to build through the registry. ``rewards_by_key`` (optional): already built
        rewards to use instead of building, keyed like the extras (tests, sharing a reward between mixtures)."""
        super().__init__()
        from rewards import build

        if not components:
            raise ValueError("weighted.components must list at least one reward")
        self.specs = [ComponentSpec.parse(c, i) for i, c in enumerate(components)]
        keys: list[str] = []
        for i, spec in enumerate(self.specs):
            key = spec.key or spec.name
            keys.append(key if key not in keys else f"{key}#{i}")
        self.keys = keys
        given = dict(rewards_by_key or {})
        built = [given[k] if k in given else build(s.name, **s.args) for k, s in zip(keys, self.specs)]
        self.components = nn.ModuleList(built)
        self.normalizers = nn.ModuleList(ScoreNormalizer(s.normalize) for s in self.specs)
        self.weights = [s.weight for s in self.specs]
        # instance-level capabilities shadow the class defaults
        self.space = "latent" if all(r.space == "latent" for r in built) else "pixel"
        self.noise_aware = all(getattr(r, "noise_aware", False) for r in built)
        self.differentiable = all(getattr(r, "differentiable", False) for r in built)
        self._generator_decode = None

    @property
    def scores_noisy_states(self) -> bool:
        return all(getattr(r, "scores_noisy_states", False) for r in self.components)

    @contextlib.contextmanager
    def held_out(self) -> Iterator[None]:
        frozen = [n.frozen for n in self.normalizers]
        for n in self.normalizers:
            n.frozen = True
        try:
            with contextlib.ExitStack() as stack:
                for reward in self.components:
                    stack.enter_context(reward.held_out())
                yield
        finally:
            for n, was in zip(self.normalizers, frozen):
                n.frozen = was

    def running_state(self) -> dict[str, Tensor]:
        state = {f"normalizers.{k}": v.detach().clone() for k, v in self.normalizers.state_dict().items()}
        for key, reward in zip(self.keys, self.components):
            state.update({f"components.{key}.{k}": v for k, v in reward.running_state().items()})
        return state

    def load_running_state(self, state: dict[str, Tensor]) -> None:
        mine = {k.removeprefix("normalizers."): v for k, v in state.items() if k.startswith("normalizers.")}
        self.normalizers.load_state_dict(mine)  # strict: a checkpoint of another mixture is refused
        for key, reward in zip(self.keys, self.components):
            prefix = f"components.{key}."
            reward.load_running_state({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})

    def attach_generator(self, generator: object) -> None:
        self._generator_decode = getattr(generator, "decode", None)
        for reward in self.components:
            reward.attach_generator(generator)

    def place(self, device: torch.device | str) -> "WeightedReward":
        """Each component places itself (a pinned one stays on its device); the statistics go to ``device``."""
        for reward in self.components:
            reward.place(device)
        self.normalizers.to(device)
        return self

    def _shared_decode(self, batch: RewardInput) -> RewardInput:
        """The batch with one memoised decoder for all pixel components (unchanged when none is needed)."""
        if self.space == "latent" or batch.images is not None or batch.latents is None:
            return batch
        fn = batch.decode or self._generator_decode
        if fn is None or isinstance(fn, MemoDecode):
            return batch
        return dataclasses.replace(batch, decode=MemoDecode(fn))

    @property
    def zscored(self) -> list[str]:
        """The keys of the components normalised by running statistics."""
        return [k for k, spec in zip(self.keys, self.specs) if spec.normalize.kind == "zscore"]

    def held_out_reference(self, scores: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
        """Mean and standard deviation of each z-scored component's ``<key>/score`` in ``scores`` (one evaluation's
        samples): the fixed statistics of :meth:`held_out_total`."""
        return {k: (float(scores[f"{k}/score"].double().mean()), float(scores[f"{k}/score"].double().std(False)))
                for k in self.zscored}

    def held_out_total(self, scores: Mapping[str, Tensor],
                       reference: Mapping[str, tuple[float, float]]) -> tuple[Tensor, dict[str, Tensor]]:
        """The total and each component's ``<key>/normalized`` score, recomputed from the components' ``<key>/score`` in
        ``scores``, each z-scored one by ``reference`` (:meth:`held_out_reference`) instead of the running statistics.

        The running statistics follow the training batches, so held-out scores normalised by them are not on one
        scale from one evaluation to the next (and before the first update they are not normalised at all);
        rlkit's evaluator normalises every evaluation by the statistics of its first one, the base policy's."""
        total: Tensor | None = None
        normalized: dict[str, Tensor] = {}
        for key, normalizer, weight in zip(self.keys, self.normalizers, self.weights):
            normed = normalizer(scores[f"{key}/score"], reference.get(key))
            normalized[f"{key}/normalized"] = normed
            total = weight * normed if total is None else total + weight * normed
        assert total is not None
        return total, normalized

    def forward(self, batch: RewardInput) -> RewardOutput:
        batch = self._shared_decode(batch)
        total: Tensor | None = None
        extras: dict[str, Tensor] = {}
        for key, reward, normalizer, weight in zip(self.keys, self.components, self.normalizers, self.weights):
            out = reward(batch)
            score = out.scores.float().to(batch.device)  # components may compute on devices of their own
            normed = normalizer(score)
            extras[f"{key}/score"] = score.detach()
            extras[f"{key}/normalized"] = normed.detach()
            extras.update({f"{key}/{k}": v for k, v in out.extras.items()})
            total = weight * normed if total is None else total + weight * normed
        assert total is not None
        return RewardOutput(scores=total, extras=extras)
