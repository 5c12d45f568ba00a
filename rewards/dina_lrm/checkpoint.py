"""Loading and saving DiNa-LRM in the release's layout.

::

    <folder>/config.json                      the training config (``model`` section decides the architecture)
    <folder>/checkpoint/backbone_lora/        peft adapter of the N-block backbone
        adapter_config.json                   (keys ``base_model.model.transformer_blocks.{i}.attn....``)
        adapter_model.safetensors
    <folder>/checkpoint/rm_head.pt            reward-head state dict
    <folder>/checkpoint/full_model.pt         instead of both, when trained without LoRA and unfrozen
    <folder>/checkpoint/logistic.pt           rlkit's addition: eta3, eta4 of the optional logistic output

A frozen-backbone checkpoint holds ``rm_head.pt`` only. ``.pt`` files load with ``weights_only=True``. The release
trains the logistic output's ``eta3``, ``eta4`` (``use_logistic``, off in its configs) but saves them only inside
``full_model.pt``; beside a LoRA or a head, rlkit writes them to ``logistic.pt``, and a checkpoint without that file
loads them at their initial values, as the release does (with a warning).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewards.dina_lrm.config import DiNaLRMConfig
from rewards.dina_lrm.model import ADAPTER_NAME, DiNaLRM
from rlkit.models.lora import LORA_INITS, load_lora_state_dict, lora_state_dict
from rlkit.models.sd3 import WeightsNotFoundError, explain_missing

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoint"
LORA_DIR = "backbone_lora"
HEAD_FILE = "rm_head.pt"
FULL_FILE = "full_model.pt"
LOGISTIC_FILE = "logistic.pt"
LOGISTIC_PARAMS = ("eta3", "eta4")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # peft's PeftModel wraps the backbone: keys start with this
UNSUPPORTED_LORA_OPTIONS = ("use_dora", "use_rslora")


def resolve_folder(source: str | Path, revision: str | None = None) -> Path:
    """A local folder (``pkg://`` paths name folders shipped in a package), or a hub id resolved through the
    Hugging Face cache (downloaded when allowed)."""
    from rlkit.confload import resolve_package_path

    source = resolve_package_path(str(source))
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(source), revision=revision))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; one readable message for all
        raise explain_missing(str(source), exc, "DiNa-LRM checkpoint") from None


def _missing(path: Path, why: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"DiNa-LRM checkpoint file {str(path)!r} is missing ({why}). Provide a folder laid out as the release "
        f"(config.json + checkpoint/backbone_lora/ + checkpoint/rm_head.pt, e.g. `hf download "
        f"liuhuohuo/DiNa-LRM-SD35M-12layers --local-dir <folder>`), or one written by rewards.dina_lrm.save_dina_lrm")


def _read(path: Path, what: str, reader: Callable[[Path], Any]) -> Any:
    """``reader(path)``; a file that does not parse (cut short by a copy or a download) is named, not left to the
    parser's own message."""
    try:
        return reader(path)
    except Exception as exc:  # JSON, pickle, zip and safetensors readers each raise their own kind
        raise ValueError(f"DiNa-LRM checkpoint file {str(path)!r} ({what}) cannot be read, so it is corrupt or cut "
                         f"short: {type(exc).__name__}: {exc}. Download or copy it again") from None


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _torch_file(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_config(folder: Path) -> DiNaLRMConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise _missing(path, "it holds the architecture")
    return DiNaLRMConfig.from_official(_read(path, "the architecture", _json), source=str(path))


def checkpoint_dir(folder: Path) -> Path:
    """``<folder>/checkpoint``, or the folder itself when it already holds the weight files."""
    inner = folder / CHECKPOINT_DIR
    return inner if inner.is_dir() or not any((folder / f).exists() for f in (LORA_DIR, HEAD_FILE, FULL_FILE)) \
        else folder


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers, if a state dict was saved wrapped


def _load_pt(path: Path, why: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise _missing(path, why)
    state = _read(path, why, _torch_file)
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _adapter_config(lora_dir: Path) -> dict:
    path = lora_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise _missing(path, "the peft adapter of the backbone")
    data = _read(path, "the peft adapter of the backbone", _json)
    for option in UNSUPPORTED_LORA_OPTIONS:
        if data.get(option):
            raise ValueError(f"{path}: {option}=true is not supported by rlkit's DiNa-LRM loader")
    return data


def _adapter_weights(lora_dir: Path) -> dict[str, torch.Tensor]:
    for name in ADAPTER_WEIGHTS:
        path = lora_dir / name
        if path.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                weights = _read(path, "the LoRA weights of the backbone", lambda p: load_file(str(p)))
            else:
                weights = _read(path, "the LoRA weights of the backbone", _torch_file)
            return {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}
    raise _missing(lora_dir / ADAPTER_WEIGHTS[0], "the LoRA weights of the backbone")


def _lora_config_from_adapter(config: DiNaLRMConfig, adapter: dict) -> DiNaLRMConfig:
    """The adapter's own r/alpha win, as peft's ``load_adapter`` builds the adapter from its saved config."""
    from dataclasses import replace

    targets = adapter.get("target_modules")
    updates = {"lora_r": int(adapter.get("r", config.lora_r)),
               "lora_alpha": float(adapter.get("lora_alpha", config.lora_alpha))}
    if isinstance(targets, list) and targets:
        updates["lora_targets"] = tuple(targets)
    return replace(config, **updates)


def load_dina_lrm(
    source: str | Path,
    transformer: nn.Module,
    share: bool = False,
    copy_blocks: bool = False,
    revision: str | None = None,
) -> DiNaLRM:
    """The checkpoint at ``source`` (folder or hub id) on ``transformer``'s first blocks, frozen and in eval mode.

    ``share=True`` puts the LoRA as adapter ``rm_lora`` onto ``transformer`` itself (see :mod:`.model`).
    """
    folder = resolve_folder(source, revision)
    config = read_config(folder)
    ckpt = checkpoint_dir(folder)
    mode = config.save_mode
    if mode == "full" and share:
        raise ValueError(f"{folder}: a full_model.pt checkpoint has its own backbone weights and cannot share the "
                         "generator's blocks; load it with share=False")
    if mode == "lora":
        lora_dir = ckpt / LORA_DIR
        config = _lora_config_from_adapter(config, _adapter_config(lora_dir))
        lora_weights = _adapter_weights(lora_dir)
        head = _load_pt(ckpt / HEAD_FILE, "the reward head")
    elif mode == "full":
        full = _load_pt(ckpt / FULL_FILE, "the whole model, saved without LoRA")
    else:
        head = _load_pt(ckpt / HEAD_FILE, "the reward head of a frozen-backbone model")
    model = DiNaLRM.build(config, transformer, share=share, copy_blocks=copy_blocks or mode == "full",
                          add_adapter=mode == "lora")
    if mode == "lora":
        load_lora_state_dict(model.adapter_host, ADAPTER_NAME, lora_weights)
    if mode == "full":
        model.load_state_dict(full, strict=True)
    else:
        model.reward_head.load_state_dict(head, strict=True)
        if config.use_logistic:
            _load_logistic(model, ckpt / LOGISTIC_FILE)
    model.set_trainable(lora=False, head=False, backbone=False)
    return model.eval()


def save_dina_lrm(model: DiNaLRM, folder: str | Path, weights: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Writes ``model`` in the release's layout (the save mode follows its config).

    ``weights`` (parameter name in ``model`` -> value) stand in for the module's values of those parameters: the
    trainer passes float32 ones (the EMA's average, or DeepSpeed's fp32 masters) where a bf16 run's module holds
    rounded copies."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    weights = dict(weights or {})
    state = model.state_dict()
    unknown = sorted(set(weights) - set(state))
    if unknown:
        raise KeyError(f"save_dina_lrm: weights for {unknown[:3]} name no parameter of the model")
    state.update(weights)
    folder = Path(folder)
    ckpt = folder / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    config = model.config
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_official(), indent=4))

    def cpu(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in values.items()}

    def part(module: nn.Module) -> dict[str, torch.Tensor]:
        """``state``'s entries for a submodule, named as in it."""
        prefix = _prefix_in(model, module)
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    mode = config.save_mode
    if mode == "full":
        torch.save(cpu(state), ckpt / FULL_FILE)
        return folder
    torch.save(cpu(part(model.reward_head)), ckpt / HEAD_FILE)
    if config.use_logistic:
        torch.save(cpu({name: state[name] for name in LOGISTIC_PARAMS}), ckpt / LOGISTIC_FILE)
    if mode == "lora":
        lora_dir = ckpt / LORA_DIR
        lora_dir.mkdir(exist_ok=True)
        host = model.adapter_host
        values = part(host) if weights else None  # a shared host (the generator's transformer) is not in `state`
        lora = lora_state_dict(host, ADAPTER_NAME, values)
        save_file({PEFT_PREFIX + k: v.contiguous() for k, v in lora.items()}, str(lora_dir / ADAPTER_WEIGHTS[0]))
        peft_config = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=list(config.lora_targets),
            exclude_modules=list(config.excluded_lora_modules) or None,
            init_lora_weights=LORA_INITS[config.lora_init],
        )
        # PEFT keeps the names as a set, written in an order that changes from run to run; sorted, a rebuilt
        # checkpoint's file equals the one before
        peft_config.target_modules = sorted(peft_config.target_modules)
        peft_config.save_pretrained(str(lora_dir))
    return folder


def _load_logistic(model: DiNaLRM, path: Path) -> None:
    if not path.is_file():
        import warnings

        warnings.warn(f"{path} is missing: the logistic output's eta3, eta4 keep their initial values (the release "
                      "does not save them beside a LoRA or a head)", stacklevel=3)
        return
    values = _load_pt(path, "the logistic output's eta3, eta4")
    if sorted(values) != sorted(LOGISTIC_PARAMS):
        raise ValueError(f"{path}: expected the keys {list(LOGISTIC_PARAMS)}, found {sorted(values)}")
    with torch.no_grad():
        for name in LOGISTIC_PARAMS:
            getattr(model, name).copy_(values[name])


def _prefix_in(model: nn.Module, module: nn.Module) -> str:
    """The prefix of ``module``'s names in ``model``'s state dict."""
    for name, sub in model.named_modules():
        if sub is module:
            return f"{name}." if name else ""
    raise ValueError(f"save_dina_lrm: {type(module).__name__} is not part of the model (a shared adapter host "
                     "cannot take weights by name)")
