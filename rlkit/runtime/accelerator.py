"""The accelerate ``Accelerator`` for a recipe: one process, DDP, or DeepSpeed ZeRO-2/3.

Launch with ``rlkit train`` or ``accelerate launch --config_file recipes/accelerate/{ddp,zero2,zero3}.yaml``;
the recipe's ``launch`` section is the source of truth and :func:`build_accelerator` builds the DeepSpeed
plugin from it (stage, gradient clipping, accumulation, precision).

Traps handled here:

* Several processes without CUDA: accelerate leaves the process-group backend unset and then reports
  ``process_index 0 / num_processes 1`` on every rank although the (gloo) group has all ranks; without
  DeepSpeed it also skips the DDP wrapper, so gradients are never averaged. Asking for ``gloo`` explicitly
  (and, without DeepSpeed, ``cpu=True`` so that accelerate picks MULTI_CPU) when there is no CUDA and
  ``WORLD_SIZE > 1`` fixes both; nothing changes with CUDA or one process.
* ``ACCELERATE_USE_CPU=1`` makes accelerate silently drop DeepSpeed; it is refused with a DeepSpeed recipe.
* RL loops prepare no DataLoader, so DeepSpeed cannot infer its batch sizes; :func:`set_deepspeed_batch_size`
  writes them into the config before ``prepare``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from rlkit.config import LaunchConfig

CPU_BACKEND = "gloo"
LAUNCHER_STAGE_ENV = "ACCELERATE_DEEPSPEED_ZERO_STAGE"  # set by `accelerate launch --zero_stage`
LAUNCHER_DEEPSPEED_ENV = "ACCELERATE_USE_DEEPSPEED"  # set by `accelerate launch --use_deepspeed`
NO_CLIPPING = 0.0
FROZEN_MICRO_BATCH = 1  # DeepSpeed insists on batch sizes even for an engine that never steps
TRUE_VALUES = ("1", "true", "yes")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(
    launch: LaunchConfig,
    *,
    grad_clip: float | None = None,
    grad_accum: int = 1,
    micro_batch: int | None = None,
    project_dir: str | os.PathLike | None = None,
    **accelerator_kwargs: Any,
):
    """An ``Accelerator`` as ``launch`` says.

    ``grad_clip`` goes to DeepSpeed's ``gradient_clipping`` under DeepSpeed (the engine clips; do not call
    ``clip_grad_norm_`` yourself there). ``micro_batch``: samples per process per forward; when given, the
    DeepSpeed batch sizes are set (see :func:`set_deepspeed_batch_size`). Extra keyword arguments go to
    ``Accelerator``.
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    if grad_accum < 1:
        raise ValueError(f"build_accelerator: grad_accum must be >= 1, got {grad_accum}")
    handlers = list(accelerator_kwargs.pop("kwargs_handlers", []))
    plugin = None
    if launch.deepspeed is not None:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in TRUE_VALUES:
            raise RuntimeError("launch.deepspeed is set but ACCELERATE_USE_CPU=1 is exported: accelerate would "
                               "silently run without DeepSpeed. Unset ACCELERATE_USE_CPU.")
        launched_stage = os.environ.get(LAUNCHER_STAGE_ENV)
        if launched_stage is not None and int(launched_stage) != launch.deepspeed:
            raise RuntimeError(f"the recipe says launch.deepspeed={launch.deepspeed} but accelerate was launched "
                               f"with ZeRO stage {launched_stage}; make them agree")
        plugin = make_deepspeed_plugin(launch.deepspeed, grad_clip=grad_clip, grad_accum=grad_accum)
    elif os.environ.get(LAUNCHER_DEEPSPEED_ENV, "").lower() in TRUE_VALUES:
        raise RuntimeError("accelerate was launched with DeepSpeed but the recipe says launch.deepspeed=null; "
                           "set launch.deepspeed to the ZeRO stage or launch without --use_deepspeed")
    if not torch.cuda.is_available() and _world_size() > 1:
        handlers.append(InitProcessGroupKwargs(backend=CPU_BACKEND))
        if plugin is None:
            accelerator_kwargs.setdefault("cpu", True)  # else DistributedType.NO: no DDP wrapper, no gradient sync
    accelerator = Accelerator(
        mixed_precision=launch.mixed_precision,
        # a plugin, not gradient_accumulation_steps: accelerate lets a launcher's exported setting override that
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum),
        deepspeed_plugin=plugin,
        project_dir=project_dir,
        kwargs_handlers=handlers,
        **accelerator_kwargs,
    )
    if accelerator.num_processes != launch.num_processes:
        raise RuntimeError(f"the recipe says launch.num_processes={launch.num_processes} but this run has "
                           f"{accelerator.num_processes} process(es); start it with `rlkit train RECIPE`, or make "
                           "the launcher's --num_processes agree")
    if micro_batch is not None:
        set_deepspeed_batch_size(accelerator, micro_batch)
    return accelerator


def close_process_group() -> None:
    """Destroys the default process group, if there is one, while the interpreter is still whole.

    Left to the interpreter's exit, gloo's worker threads may still hold tensors whose release needs the
    Python that is being torn down, and a rank whose run succeeded aborts (SIGABRT, "terminate called
    without an active exception"; pytorch/pytorch#190489), failing the launch. accelerate's ``end_training``
    does the same. Call it once, where a process that ran a recipe ends: the group is gone after it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while another still talks
        dist.destroy_process_group()


def make_deepspeed_plugin(stage: int, grad_clip: float | None = None, grad_accum: int = 1):
    """accelerate's ``DeepSpeedPlugin`` for ZeRO ``stage`` (2 or 3), without offload."""
    from accelerate import DeepSpeedPlugin

    if stage not in (2, 3):
        raise ValueError(f"launch.deepspeed: ZeRO stage must be 2 or 3, got {stage}")
    plugin = DeepSpeedPlugin(
        zero_stage=stage,
        gradient_accumulation_steps=grad_accum,
        gradient_clipping=grad_clip,
        zero3_init_flag=False,  # models are built before the plugin exists; ZeRO-3 partitions at prepare
        zero3_save_16bit_model=stage == 3,
    )
    # accelerate turns an unset ("auto") clip into 1.0; DeepSpeed reads 0 as "no clipping"
    plugin.deepspeed_config["gradient_clipping"] = float(grad_clip) if grad_clip else NO_CLIPPING
    return plugin


def uses_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage, or None without DeepSpeed."""
    if not uses_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


@contextlib.contextmanager
def full_weights_loading(accelerator) -> Iterator[None]:
    """Loads models whole even under ZeRO-3.

    With a ZeRO-3 accelerator alive, transformers/diffusers ``from_pretrained`` build models inside
    ``deepspeed.zero.Init`` and partition them. Only what is handed to ``prepare`` gets an engine that gathers
    it; frozen parts (text encoders, VAE) would stay partitioned with nothing to gather them.
    """
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None) -> contextlib.AbstractContextManager:
    """Whole ``params`` inside the context when ZeRO-3 partitions them, a no-op otherwise. Every rank must enter
    it (it gathers); with ``modifier_rank`` the values that rank writes are re-partitioned on exit."""
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def full_precision(params: Iterable[nn.Parameter]) -> list[Tensor]:
    """Each parameter's value in float32, whole: DeepSpeed's fp32 master copy where its optimiser keeps one (under
    bf16 or fp16 the module holds a rounded copy of it; under ZeRO-3 a partition), else the parameter, upcast.

    Where DeepSpeed holds the masters every rank must call it (it gathers their partitions)."""
    params = list(params)
    if not any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in params):
        return [p.detach().float() for p in params]
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in params:
        master = safe_get_full_fp32_param(p)
        out.append(p.detach().float() if master is None else master.detach().float())
    return out


def set_deepspeed_batch_size(accelerator, micro_batch: int) -> None:
    """Sets ``train_micro_batch_size_per_gpu`` and ``train_batch_size`` in the DeepSpeed config.

    DeepSpeed checks ``train_batch_size == micro * accumulation * world``; accelerate fills these from a
    prepared DataLoader, which RL loops do not have. No-op without DeepSpeed.
    """
    if micro_batch < 1:
        raise ValueError(f"set_deepspeed_batch_size: micro_batch must be >= 1, got {micro_batch}")
    if not uses_deepspeed(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    steps = config.get("gradient_accumulation_steps", accelerator.gradient_accumulation_steps)
    config["train_batch_size"] = micro_batch * steps * accelerator.num_processes


def prepare_frozen(accelerator, model: nn.Module) -> nn.Module:
    """Prepares a frozen helper model (reference policy, reward) for inference on every rank.

    Without DeepSpeed, or under ZeRO-1/2, it is simply frozen, put in eval mode and moved to the device (each
    rank keeps a full copy). Under ZeRO-3 it is wrapped in an inference-only DeepSpeed engine whose parameters
    are partitioned like the policy's, so that large frozen models do not sit whole on every rank.
    """
    model.requires_grad_(False)
    model.eval()
    if zero_stage(accelerator) != 3:
        return model.to(accelerator.device)
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(key, None)
    config = {key: value for key, value in config.items() if value != "auto"}  # unfilled before prepare()
    config.setdefault("train_micro_batch_size_per_gpu", FROZEN_MICRO_BATCH)
    config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
                                  * accelerator.num_processes)
    config["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
