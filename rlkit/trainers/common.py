"""What the trainers share: functions, not a base class.

Generator + policy set-up, rewards from recipe specs, optimiser and schedule, the evaluator, and the
run folder. The trainers stay readable top to bottom and call these. The policy run (ReFL, Flow-GRPO) and
the reward-model run also share one optimiser update, EMA weights, and resumable checkpoints with the
SIGTERM stop (:func:`optimizer_step`, :func:`ema_weights`, :func:`save_training_state`,
:func:`load_training_state`, :func:`checkpoint_or_stop`), plus the process ranks (:class:`Processes`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import rewards as reward_registry
from rewards.base import Reward
from rlkit.confload import flatten, resolve_package_path
from rlkit.config import EvalConfig, LoRAConfig, ModelConfig, OptimConfig, Recipe, RewardSpec
from rlkit.evaluate import Evaluator, Shard
from rlkit.models.sd3 import SD3Generator
from rlkit.prompts import load_prompts


def load_generator(cfg: ModelConfig, device: torch.device | str = "cpu") -> SD3Generator:
    source = resolve_package_path(cfg.pretrained)
    gen = SD3Generator.from_pretrained(source, dtype=cfg.dtype, device=device,
                                       max_sequence_length=cfg.max_sequence_length, revision=cfg.revision)
    gen.cache_limit = cfg.text_cache_size
    gen.transformer.requires_grad_(False)
    gen.configure_decode(cfg.decode)
    return gen


def prepare_policy(gen: SD3Generator, lora: LoRAConfig,
                   gradient_checkpointing: bool = False) -> list[torch.nn.Parameter]:
    """Attaches the policy LoRA (or unfreezes the transformer) and returns the trainable parameters."""
    from rlkit.models.lora import add_lora, enable_adapter_aware_checkpointing

    transformer = gen.transformer
    if lora.enabled:
        add_lora(transformer, lora.adapter_name, rank=lora.rank, alpha=lora.alpha,
                 target_modules=list(lora.target_modules), init=lora.init)
    else:
        transformer.requires_grad_(True)
    if gradient_checkpointing:
        enable_adapter_aware_checkpointing(transformer)
    return [p for p in transformer.parameters() if p.requires_grad]


def _ready(reward: Reward, gen: SD3Generator | None, device: torch.device | str | None) -> Reward:
    """Attaches the generator, then puts the reward on the training ``device`` (:meth:`Reward.place`: a
    reward whose args name a device, or one sharing the policy's blocks, stays where it is)."""
    if gen is not None:
        reward.attach_generator(gen)
    if device is not None:
        reward.place(device)
    return reward


def build_reward(specs: list[RewardSpec], gen: SD3Generator | None = None,
                 device: torch.device | str | None = None) -> Reward:
    """One reward from the recipe's list: the reward itself, or a ``weighted`` mixture of several (each component
    normalised as its ``normalize`` says), placed on ``device`` (the accelerator's) when given."""
    if len(specs) == 1 and specs[0].weight == 1.0 and specs[0].normalize is None:
        reward = reward_registry.build(specs[0].name, **specs[0].args)
    else:
        reward = reward_registry.build("weighted", components=[
            {"name": s.name, "weight": s.weight, "args": dict(s.args),
             **({"normalize": s.normalize} if s.normalize is not None else {})} for s in specs])
    return _ready(reward, gen, device)


def build_named_rewards(specs: list[RewardSpec], gen: SD3Generator | None = None,
                        device: torch.device | str | None = None) -> dict[str, Reward]:
    out: dict[str, Reward] = {}
    for spec in specs:
        reward = _ready(reward_registry.build(spec.name, **spec.args), gen, device)
        reward.requires_grad_(False)
        out[spec.name if spec.name not in out else f"{spec.name}_{len(out)}"] = reward
    return out


def reference_context(run) -> Callable[[], contextlib.AbstractContextManager]:
    """A context that turns ``run``'s policy into its reference, the base model (every LoRA adapter disabled)."""
    from rlkit.models.lora import use_adapter

    accelerator = getattr(run, "accelerator", None)
    module = accelerator.unwrap_model(run.model) if accelerator is not None else run.model
    return lambda: use_adapter(module, None)


def require_noise_aware(reward: Reward, algorithm: str) -> None:
    """Refuses a recipe that scores noisy states at their own sigma (``NOISY_STATE_SETTINGS[algorithm]``) with a
    reward that reads only clean latents or pixels, or a noise-aware one set to noise clean latents itself: it would
    score the wrong thing, silently."""
    from rlkit.config import not_noise_aware, not_scoring_states

    name = type(reward).__name__
    if not getattr(reward, "noise_aware", False):
        raise ValueError(not_noise_aware(algorithm, name))
    if not getattr(reward, "scores_noisy_states", True):
        raise ValueError(not_scoring_states(algorithm, name))


def require_differentiable(reward: Reward, field: str) -> None:
    """Refuses a reward (or a mixture with a component) whose scores carry no gradient to the latents: ReFL would
    train on part of the reward, or on its regularisers alone, while logging the whole."""
    from rlkit.config import not_differentiable

    if not getattr(reward, "differentiable", True):
        parts = [f"{type(r).__name__}" for r in getattr(reward, "components", [reward])
                 if not getattr(r, "differentiable", True)]
        raise ValueError(f"{field}: {not_differentiable(parts)}")


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based): linear warmup, then the schedule."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, total_steps: int):
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.schedule))
    return optimizer, scheduler


def build_evaluator(cfg: EvalConfig, gen: SD3Generator, proxy: dict[str, Reward], resolution: int,
                    device: torch.device | str | None = None) -> Evaluator:
    """The evaluator; its golden rewards are built here and placed on ``device`` like the training reward."""
    prompts = load_prompts(cfg.prompts, cfg.num_prompts)
    return Evaluator(prompts=prompts, images_per_prompt=cfg.images_per_prompt, seed=cfg.seed,
                     num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                     golden=build_named_rewards(cfg.golden, gen, device), proxy=proxy, batch_size=cfg.batch_size,
                     grid_images=cfg.grid_images, patience=cfg.early_stopping_patience,
                     resolution=resolution)


def run_dir(recipe: Recipe) -> Path:
    path = recipe.run_dir
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# what a run does around its algorithm: ranks, the optimiser update, EMA, checkpoints and the stop


class Processes:
    """The process layout of a run that holds an ``accelerator`` (mixed into the run dataclasses)."""

    accelerator: Any

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def rank_slice(self, n: int) -> slice:
        """This process's rows of a global batch of ``n`` rows per process."""
        return slice(self.rank * n, (self.rank + 1) * n)

    def shard(self) -> Shard:
        """This process's share of an evaluation, gathered through the accelerator."""
        device = self.accelerator.device
        return Shard(self.rank, self.world, lambda t: self.accelerator.gather(t.to(device)).cpu())


def over_ranks(accelerator, stats: dict[str, float]) -> dict[str, float]:
    """``stats`` of every rank combined, so that what the main process logs describes the global batch: the mean,
    and for ``*_max`` keys the largest. Every rank calls it with the same keys (a collective)."""
    if accelerator.num_processes == 1:
        return dict(stats)
    keys = sorted(stats)
    local = torch.tensor([[float(stats[k]) for k in keys]], dtype=torch.float64, device=accelerator.device)
    every = accelerator.gather(local)  # (processes, keys)
    return {k: float(every[:, i].max() if k.endswith("_max") else every[:, i].mean()) for i, k in enumerate(keys)}


def trainable_weights(model: torch.nn.Module, ema=None) -> dict[str, torch.Tensor]:
    """The trainable parameters' float32 values by name, whole: the EMA's average where there is one, else the
    weights (:func:`rlkit.runtime.accelerator.full_precision`: DeepSpeed's fp32 masters in a bf16 run) copied to
    the CPU, where they are written from (a whole fp32 copy of a fully trained model need not sit on the
    accelerator). Every rank must call it."""
    from rlkit.runtime.accelerator import full_precision, gathered

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if ema is not None:
        average = {id(p): shadow for p, shadow in zip(ema.params, ema.shadow)}
        return {name: average[id(p)] for name, p in named}
    with torch.no_grad(), gathered(p for _, p in named):
        return dict(zip((name for name, _ in named),
                        (v.to("cpu", copy=True) for v in full_precision(p for _, p in named))))


def ema_weights(ema) -> contextlib.AbstractContextManager:
    """The body runs with the EMA weights in place (a no-op without EMA)."""
    return ema.applied() if ema is not None else contextlib.nullcontext()


def optimizer_step(accelerator, optimizer, scheduler, ema, params: Iterable[torch.nn.Parameter],
                   grad_clip: float | None) -> dict[str, float]:
    """Clips ``params`` (unless DeepSpeed clips inside its engine), steps the optimiser and the schedule, zeroes
    the gradients, updates EMA; returns ``{"grad_norm": ...}`` when it clipped."""
    from rlkit.runtime.accelerator import uses_deepspeed

    stats: dict[str, float] = {}
    if grad_clip and not uses_deepspeed(accelerator):
        stats["grad_norm"] = float(accelerator.clip_grad_norm_(params, grad_clip))
    elif uses_deepspeed(accelerator):  # the engine clipped (and stepped) in the boundary's backward
        norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        if norm is not None:
            stats["grad_norm"] = float(norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()
    return stats


def discard_gradients(accelerator, optimizer, model) -> None:
    """Drops what a skipped update accumulated. Under DeepSpeed the accelerate optimiser's ``zero_grad`` does
    nothing and the ZeRO optimiser accumulates the micro-batches itself: its buffers are cleared and its micro-step
    count reset, so that nothing of the skipped update reaches the next one."""
    from rlkit.runtime.accelerator import uses_deepspeed

    optimizer.zero_grad(set_to_none=True)
    if uses_deepspeed(accelerator):
        zero = model.optimizer  # the engine's ZeRO optimiser (stage 3 resets its micro-step count itself)
        zero.zero_grad(set_to_none=True)
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

        if isinstance(zero, DeepSpeedZeroOptimizer):  # ZeRO-1/2 sum the micro-batches' reduced gradients apart
            zero.micro_step_id = INITIAL_MICRO_STEP_ID
            zero.all_grad_tensors = {i: None for i in zero.all_grad_tensors}
            zero.averaged_gradients = {}


@dataclass
class Stopwatch:
    """A run's training time (``time/elapsed_s``), kept in its checkpoints so that a resumed run's goes on."""

    offset_s: float = 0.0
    since: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.offset_s + time.perf_counter() - self.since

    def restart_at(self, elapsed_s: float) -> None:
        self.offset_s, self.since = elapsed_s, time.perf_counter()


def save_training_state(checkpoints, accelerator, step: int, *, scheduler, ema, guard, clock: Stopwatch,
                        write: Callable[[Path], None] | None = None, **extra: Any) -> Path:
    """A resumable checkpoint (:class:`rlkit.runtime.checkpoint.CheckpointManager`): what ``accelerator``
    prepared (weights, optimiser, RNG states), the schedule, EMA, guard counters, the time trained and
    ``extra``; ``write`` adds files to it (main process). Every process must call it."""
    tensors = {"step": step, "ema": ema.state_dict() if ema is not None else None, "elapsed_s": clock.elapsed(),
               "scheduler": scheduler.state_dict(), "guard": guard.state_dict(), **extra}
    return checkpoints.save(accelerator, step, tensors, write=write)


def load_training_state(checkpoints, accelerator, *, scheduler, ema, guard, clock: Stopwatch) -> dict[str, Any] | None:
    """Restores the newest complete checkpoint written by :func:`save_training_state` into the prepared objects,
    the schedule, EMA, the guard and the clock; returns its ``extra`` (with ``step``), or None when there is none."""
    extra = checkpoints.load_latest(accelerator)
    if extra is None:
        return None
    scheduler.load_state_dict(extra["scheduler"])
    guard.load_state_dict(extra["guard"])
    clock.restart_at(float(extra.get("elapsed_s", 0.0)))
    if ema is not None and extra.get("ema") is not None:
        ema.load_state_dict(extra["ema"])
    return extra


# recipe keys a resumed run may change: how long it runs, how often and in what batches it is evaluated (each sample
# draws its own noise), which golden rewards judge it, how it is logged and checkpointed. Anything else would go on
# training another run from this one's weights, optimiser and data position, or evaluate it on other prompts, seeds
# or samplers than its earlier evaluations
RESUMABLE_CHANGES = ("name", "output_dir", "checkpoint.", "logging.", "eval.every", "eval.batch_size", "eval.golden",
                     "eval.early_stopping_patience", "eval.grid_images", "refl.max_steps", "flow_grpo.max_epochs",
                     "reward_model.max_steps", "reward_model.epochs", "reward_model.eval_every",
                     "launch.main_process_port", "launch.stop_grace_s", "model.text_cache_size")


def check_resumable(stored: Path, recipe: Recipe) -> None:
    """Refuses to resume the run whose resolved recipe is ``stored`` with a recipe that trains something else."""
    import yaml

    if not stored.is_file():
        return
    before, now = flatten(yaml.safe_load(stored.read_text()) or {}), flatten(recipe.to_dict())
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed:
        listed = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(f"{stored.parent}: resuming a run with other training settings ({listed}). Start a new run "
                         f"(another `name`, or checkpoint.resume=false to train this one afresh), or resume it with "
                         f"the settings it was started with")


def open_run_folder(recipe: Recipe, accelerator, checkpoint_dir: str = "checkpoints"):
    """The run folder's checkpoints and tracker, and the resolved ``recipe.yaml``. A run that resumes from a
    checkpoint must keep its training settings (:func:`check_resumable`); its tracker drops what the killed run
    logged after that checkpoint."""
    from rlkit.config import save_resolved
    from rlkit.runtime.checkpoint import CheckpointManager, list_checkpoints
    from rlkit.runtime.tracking import Tracker

    folder = run_dir(recipe)
    checkpoints = CheckpointManager(folder / checkpoint_dir, keep_last=recipe.checkpoint.keep_last)
    resume_step = checkpoints.latest_step() if recipe.checkpoint.resume else None
    if resume_step is not None:
        check_resumable(folder / "recipe.yaml", recipe)
    elif recipe.checkpoint.resume and (found := list_checkpoints(checkpoints.directory)):
        # atomic writes never leave a step_N folder incomplete: these were cut short from outside (a partial copy),
        # and starting afresh would drop the run's logged metrics with them
        raise ValueError(f"{checkpoints.directory}: none of its checkpoints ({', '.join(p.name for _, p in found)}) "
                         "is complete, so the run cannot resume. Restore one, or set checkpoint.resume=false to "
                         "train this run afresh")
    if accelerator.is_main_process:
        if not recipe.checkpoint.resume and (removed := checkpoints.clear()):
            print(f"[rlkit] checkpoint.resume=false: removed the {removed} checkpoint(s) of the run before in "
                  f"{checkpoints.directory}", flush=True)
        save_resolved(recipe, folder)
    tracker = Tracker(folder, recipe.logging, config=recipe.to_dict(), enabled=accelerator.is_main_process,
                      resume_step=resume_step)
    return checkpoints, tracker


def checkpoint_or_stop(step: int, every: int, guard, save: Callable[[], Path], close: Iterable[Any] = (),
                       boundary: int = 1) -> None:
    """After update ``step``, at the same point on every rank: ``save()`` when ``step`` is a multiple of ``every``
    (0: never) or when any rank received SIGTERM; after a stop, closes ``close`` (tracker, guard) and exits with
    the message as status (1, not 0: sweep scripts mark a run done on 0; the next launch resumes it).

    ``boundary``: a stop waits for a step that is a multiple of it (Flow-GRPO: the end of an epoch, whose rollouts
    a resumed run could not draw again from the policy that drew them)."""
    stop = guard.should_stop() and step % boundary == 0
    folder = save() if (every and step % every == 0) or stop else None
    if stop:
        for thing in close:
            thing.close()
        raise SystemExit(f"stopped by signal after step {step}; checkpoint saved in {folder}")
