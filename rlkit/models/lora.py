"""LoRA adapters (peft) on SD3-family transformers, and safe switching between them.

Several adapters can live on one backbone: the policy LoRA, a reward LoRA (DiNa-LRM sharing the generator's
weights) and "no adapter" (the base model, a KL reference). Two traps make the obvious peft calls wrong inside
one autograd graph, and this module exists to avoid them:

* peft's ``set_adapter`` / ``enable_adapters`` flip ``requires_grad`` of adapter weights. Switching to the
  reference model in the middle of a policy forward would silently drop the policy's gradients.
  :func:`use_adapter` switches adapters and leaves every ``requires_grad`` as it found it.
* gradient checkpointing re-runs a block at backward time under whichever adapter is active *then*.
  :func:`enable_adapter_aware_checkpointing` makes each re-run re-enter the adapter state of its forward.

Adapter weights are created in float32, even on a bf16/fp16 backbone (peft casts the layer input to the adapter
dtype and the result back); a DeepSpeed bf16/fp16 module holds 16-bit copies of them, its fp32 masters living in
the optimiser.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from rlkit.config import SD3_ATTN_TARGETS  # defined with the recipe schema, which stays free of torch

LORA_INITS = {"gaussian": "gaussian", "default": True, "random": False}  # our name -> peft init_lora_weights
BLOCKS_PREFIX = "transformer_blocks"

# per tuner layer: (active adapter names, adapters disabled)
AdapterState = dict[nn.Module, tuple[tuple[str, ...], bool]]


def _tuner_layers(model: nn.Module) -> Iterator[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            yield module


def _target_pattern(target_modules: Sequence[str], block_indices: Sequence[int]) -> str:
    """A regex (peft full-matches it against module names) for the targets inside the given blocks."""
    blocks = "|".join(str(int(i)) for i in block_indices)
    targets = "|".join(re.escape(t) for t in target_modules)
    return rf"(?:.*\.)?{BLOCKS_PREFIX}\.(?:{blocks})\.(?:.*\.)?(?:{targets})"


def adapter_names(model: nn.Module) -> set[str]:
    """All adapter names injected anywhere in ``model``."""
    names: set[str] = set()
    for layer in _tuner_layers(model):
        names |= layer._get_available_adapters()
    return names


def add_lora(
    model: nn.Module,
    adapter_name: str,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] = SD3_ATTN_TARGETS,
    init: str = "gaussian",
    block_indices: Sequence[int] | None = None,
    trainable: bool = True,
) -> None:
    """Injects a LoRA adapter named ``adapter_name`` and makes it the active adapter.

    ``init``: ``gaussian`` (A ~ N(0, std 1/r), B = 0), ``default`` (Kaiming A, B = 0) or ``random`` (both random,
    not a no-op; for tests). ``block_indices`` restricts the targets to ``transformer_blocks.{i}``.
    The new weights are float32 and have ``requires_grad = trainable``; every parameter that existed before
    keeps its ``requires_grad`` (peft would freeze the whole model and unfreeze only the newest adapter).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if init not in LORA_INITS:
        raise ValueError(f"add_lora: init must be one of {sorted(LORA_INITS)}, got {init!r}")
    if rank <= 0:
        raise ValueError(f"add_lora: rank must be > 0, got {rank}")
    if adapter_name in adapter_names(model):
        raise ValueError(f"add_lora: adapter {adapter_name!r} already exists")
    if block_indices is not None and len(block_indices) == 0:
        raise ValueError("add_lora: block_indices is empty; pass None for all blocks")
    targets: list[str] | str = list(target_modules)
    if block_indices is not None:
        targets = _target_pattern(target_modules, block_indices)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=LORA_INITS[init])

    before = {id(p): p.requires_grad for p in model.parameters()}
    previous = _capture(model)
    with warnings.catch_warnings():  # several adapters on one model is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        if hasattr(model, "add_adapter") and hasattr(model, "_hf_peft_config_loaded"):  # diffusers PeftAdapterMixin
            model.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
    added = 0
    for name, param in model.named_parameters():
        if id(param) in before:
            param.requires_grad_(before[id(param)])
        elif f".{adapter_name}." in f".{name}.":
            param.data = param.data.float()
            param.requires_grad_(trainable)
            added += 1
    if added == 0:
        raise ValueError(f"add_lora: no module of the model matches target_modules={targets!r}")
    _restore(previous)
    _apply(model, (adapter_name,), disabled=False)


def _capture(model: nn.Module) -> AdapterState:
    return {layer: (tuple(layer.active_adapters), bool(layer.disable_adapters)) for layer in _tuner_layers(model)}


def _set_layer(layer: nn.Module, active: tuple[str, ...], disabled: bool) -> None:
    """Sets one tuner layer's active adapters without touching any ``requires_grad``."""
    if tuple(layer.active_adapters) == active and bool(layer.disable_adapters) == disabled:
        return
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    layer.set_adapter(list(active))
    layer.enable_adapters(not disabled)
    for param, flag in flags:
        param.requires_grad_(flag)


def _restore(state: AdapterState) -> None:
    for layer, (active, disabled) in state.items():
        _set_layer(layer, active, disabled)


def _apply(model: nn.Module, active: tuple[str, ...], disabled: bool) -> None:
    for layer in _tuner_layers(model):
        _set_layer(layer, active, disabled)


def active_adapters(model: nn.Module) -> list[str] | None:
    """The active adapter names of ``model`` (None when adapters are disabled; [] when it has none)."""
    for layer in _tuner_layers(model):
        return None if layer.disable_adapters else list(layer.active_adapters)
    return []


@contextmanager
def use_adapter(model: nn.Module, name: str | Sequence[str] | None) -> Iterator[None]:
    """Runs the body with adapter ``name`` active (a list: several at once; None: all disabled = base model).

    No parameter's ``requires_grad`` changes, so one autograd graph may mix forwards under different adapters;
    the previous adapter state is restored on exit, also after an exception.
    """
    known = adapter_names(model)
    wanted = () if name is None else ((name,) if isinstance(name, str) else tuple(name))
    missing = [n for n in wanted if n not in known]
    if missing:
        raise KeyError(f"use_adapter: unknown adapter(s) {missing}; the model has {sorted(known)}")
    previous = _capture(model)
    try:
        if name is None:
            for layer, (active, _) in previous.items():
                _set_layer(layer, active, disabled=True)
        else:
            _apply(model, wanted, disabled=False)
        yield
    finally:
        _restore(previous)


def checkpoint_under_forward_adapter(block: nn.Module, *args, **kwargs):
    """Checkpoints ``block(*args)``; the backward-time re-run uses the adapters active at forward time.

    Usable as a diffusers ``gradient_checkpointing_func`` or directly by hand-written block loops.
    """
    state = _capture(block)

    def run(*inner_args, **inner_kwargs):
        current = _capture(block)
        _restore(state)
        try:
            return block(*inner_args, **inner_kwargs)
        finally:
            _restore(current)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def enable_adapter_aware_checkpointing(transformer: nn.Module) -> None:
    """Gradient checkpointing whose backward-time re-runs use the adapters active at forward time.

    Needed whenever one graph runs the same blocks under different adapters (policy and reference, policy and
    reward LoRA): plain checkpointing would recompute every block under the adapter active at ``backward()``.
    """
    if not getattr(transformer, "_supports_gradient_checkpointing", False):
        raise ValueError(f"{type(transformer).__name__} does not support diffusers gradient checkpointing")
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_under_forward_adapter)


def lora_state_dict(model: nn.Module, adapter_name: str,
                    values: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's layout (adapter name stripped from the keys), detached on CPU.

    ``values`` (parameter name -> value) stand in for the module's values of those parameters (float32 ones
    where a bf16 run's module holds rounded copies). Under ZeRO-3 gather the parameters first (e.g.
    ``deepspeed.zero.GatheredParameters``).
    """
    if adapter_name not in adapter_names(model):
        raise KeyError(f"lora_state_dict: unknown adapter {adapter_name!r}")
    values = values or {}
    marker = f".{adapter_name}."
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if marker in f".{name}." and ".lora_" in name:
            out[name.replace(marker, ".")] = values.get(name, param).detach().cpu().clone()
    return out


def load_lora_state_dict(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads weights saved by :func:`lora_state_dict` into an existing adapter; every key must match."""
    if adapter_name not in adapter_names(model):
        raise KeyError(f"load_lora_state_dict: unknown adapter {adapter_name!r}; add it with add_lora first")
    marker = f".{adapter_name}."
    targets = {
        name.replace(marker, "."): param
        for name, param in model.named_parameters()
        if marker in f".{name}." and ".lora_" in name
    }
    missing = sorted(set(targets) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(targets))
    if missing or unexpected:
        raise KeyError(f"load_lora_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    with torch.no_grad():
        for key, param in targets.items():
            if state_dict[key].shape != param.shape:
                raise ValueError(f"load_lora_state_dict: {key} has shape {tuple(state_dict[key].shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(state_dict[key].to(param.dtype))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (what the optimiser gets)."""
    return [p for p in model.parameters() if p.requires_grad]
