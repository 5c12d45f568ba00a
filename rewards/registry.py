"""Lazy name -> reward registry.

Built-in rewards are listed as ``module:Class`` strings, so ``import rewards`` loads no model code.
Third-party rewards plug in through the ``rlkit.rewards`` entry-point group, or are named directly as a
dotted ``package.module:Class`` path.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping

ENTRY_POINT_GROUP = "rlkit.rewards"

_BUILTIN: dict[str, str] = {
    "dina-lrm": "rewards.dina_lrm.reward:DiNaLRMReward",
    "pickscore": "rewards.pickscore:PickScoreReward",
    "hpsv3": "rewards.hpsv3:HPSv3Reward",
    "weighted": "rewards.weighted:WeightedReward",
    "shapes-golden": "rlkit.shapes.judges:GoldenJudgeReward",
    "shapes-clip": "rlkit.shapes.judges:ShapesClipReward",
    "latent-direction": "rewards.toy:LatentDirectionReward",
}


class Registry:
    """Maps reward names to classes; holds no global state beyond what callers give it."""

    def __init__(self, builtin: dict[str, str] | None = None):
        self._targets: dict[str, str | type] = dict(builtin or {})
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            self._targets[name] = cls
            return cls

        return deco

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self._targets.setdefault(ep.name, ep.value)

    def available(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._targets)

    def resolve(self, name: str) -> type:
        self._load_entry_points()
        target = self._targets.get(name)
        if target is None and ":" in name:
            target = name
        if target is None:
            known = self.available()
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown reward {name!r}.{hint} Known rewards: {', '.join(known)}")
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            try:
                module = importlib.import_module(module_name)
                cls = getattr(module, attr)
            except (ImportError, AttributeError) as exc:
                raise KeyError(f"reward {name!r} points to {target!r}, which cannot be imported: {exc}") from exc
            if name in self._targets:  # a registered name (a module:Class path given directly is not listed)
                self._targets[name] = cls
            return cls
        return target

    def check_args(self, name: str, kwargs: Mapping[str, Any]) -> type:
        """The class of reward ``name``, once ``kwargs`` fit its constructor: its named parameters and, for its
        ``**kwargs``, the fields of its ``args_class`` (when it declares one). Raises ``TypeError`` naming the args
        that do not fit and what the reward takes."""
        from rewards.base import Reward

        cls = self.resolve(name)
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise KeyError(f"reward {name!r} resolves to {cls!r}, which is not a rewards.base.Reward class")
        signature = inspect.signature(cls)
        takes = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        args_class = getattr(cls, "args_class", None)
        if args_class is not None:
            takes += [f.name for f in dataclasses.fields(args_class) if f.name not in takes]
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            raise TypeError(f"reward {name!r}: args {sorted(kwargs)} do not fit it ({exc}); "
                            f"it takes: {', '.join(takes) or 'none'}") from None
        unknown = sorted(set(kwargs) - set(takes)) if args_class is not None else []
        if unknown:
            hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, takes, n=1))
                     else repr(k) for k in unknown]
            raise TypeError(f"reward {name!r}: unknown args {', '.join(hints)}; it takes: {', '.join(takes)}")
        return cls

    def build(self, name: str, **kwargs: Any):
        """An instance of reward ``name``; one whose args name a ``device`` is pinned there
        (:meth:`rewards.base.Reward.place` leaves it on that device)."""
        reward = self.check_args(name, kwargs)(**kwargs)
        if kwargs.get("device") is not None and hasattr(reward, "place"):
            reward.pinned_device = kwargs["device"]
        return reward


REGISTRY = Registry(_BUILTIN)
