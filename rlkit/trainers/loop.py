"""The run that ReFL and Flow-GRPO share: set-up, one optimiser update at a time, evaluation, checkpoints.

:class:`PolicyRun` is a composition of the runtime pieces (accelerator, generator + policy LoRA, reward,
optimiser, EMA, tracker, evaluator, checkpoints, guards), not a base class with behaviour to override:
each trainer keeps its algorithm in its own loop and calls these few methods around it.

Batch arithmetic follows from the world size at run time: a trainer asks for a per-process micro-batch;
prompts and initial noise are drawn for the *global* batch from a seed shared by every rank and each rank
takes its slice, so a run on 2 processes sees the same data as one process with twice the micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from rewards.base import Reward
from rlkit.config import PretrainLossConfig, Recipe
from rlkit.runtime.accelerator import full_weights_loading, gathered
from rlkit.runtime.seeding import derive_seed, make_generator
from rlkit.trainers import common


@dataclass
class SamplePool:
    """Latents + prompts to draw pre-training-loss batches from (base-model samples or a data set)."""

    latents: Tensor
    prompts: list[str]

    def draw(self, rng: torch.Generator, n: int) -> tuple[Tensor, list[str]]:
        idx = torch.randint(0, self.latents.shape[0], (n,), generator=rng)
        return self.latents[idx], [self.prompts[int(i)] for i in idx]


@dataclass
class PolicyRun(common.Processes):
    recipe: Recipe
    accelerator: object
    gen: object  # SD3Generator
    model: torch.nn.Module  # the (prepared) policy transformer
    reward: torch.nn.Module
    optimizer: object
    scheduler: object
    ema: object | None
    tracker: object
    evaluator: object
    checkpoints: object
    guard: object
    prompts: list[str]
    total_updates: int
    micro_batch: int
    run_dir: Path
    step: int = 0
    clock: common.Stopwatch = field(default_factory=common.Stopwatch)
    last_metrics: dict = field(default_factory=dict)
    stopped_early: bool = False
    saved_step: int = -1  # the step of the newest checkpoint this run wrote or resumed from
    checkpoint_boundary: int = 1  # a SIGTERM stop saves at a multiple of it (Flow-GRPO: an epoch's updates)
    _skip: bool = False  # the current update saw a non-finite loss

    # -- set-up --------------------------------------------------------------------------------------
    @classmethod
    def setup(cls, recipe: Recipe, total_updates: int, micro_batch: int, grad_accum: int,
              check_reward: Callable[[Reward], None] | None = None) -> "PolicyRun":
        """Loads, prepares and (at step 0) evaluates a run; ``check_reward`` refuses a reward the algorithm cannot
        use, as soon as it is built."""
        from rlkit.runtime.accelerator import build_accelerator
        from rlkit.runtime.ema import EMA
        from rlkit.runtime.guards import TrainingGuard

        prompts = common.load_prompts(recipe.prompts.source, recipe.prompts.limit)  # a bad source fails first
        run_dir = common.run_dir(recipe)
        accelerator = build_accelerator(recipe.launch, grad_accum=grad_accum, micro_batch=micro_batch,
                                        grad_clip=recipe.optim.grad_clip)
        checkpoints, tracker = common.open_run_folder(recipe, accelerator)  # before any weights load
        torch.manual_seed(derive_seed(recipe.seed, "init"))
        with full_weights_loading(accelerator):
            gen = common.load_generator(recipe.model, device=accelerator.device)
            params = common.prepare_policy(gen, recipe.lora, recipe.model.gradient_checkpointing)
            reward = common.build_reward(recipe.rewards, gen, device=accelerator.device)
        if check_reward is not None:
            check_reward(reward)
        optimizer, scheduler = common.build_optimizer(params, recipe.optim, total_updates)
        model, optimizer = accelerator.prepare(gen.transformer, optimizer)
        model.train()  # as after every evaluation: a resumed run trains in the mode a fresh one does
        ema = EMA(params, decay=recipe.ema.decay, update_every=recipe.ema.update_every) if recipe.ema.enabled else None
        proxy = {spec.name: reward for spec in recipe.rewards[:1]} if len(recipe.rewards) == 1 else {"mix": reward}
        with full_weights_loading(accelerator):
            evaluator = common.build_evaluator(recipe.eval, gen, proxy, recipe.model.resolution,
                                               device=accelerator.device)
        run = cls(recipe=recipe, accelerator=accelerator, gen=gen, model=model, reward=reward, optimizer=optimizer,
                  scheduler=scheduler, ema=ema, tracker=tracker, evaluator=evaluator, checkpoints=checkpoints,
                  guard=TrainingGuard(), prompts=prompts,
                  total_updates=total_updates, micro_batch=micro_batch, run_dir=run_dir)
        if recipe.checkpoint.resume:
            run._resume()
        tracker.start_progress(total_updates, initial=run.step, desc=recipe.name)
        if run.step == 0:
            run.evaluate()
        return run

    # -- data and randomness (``world``, ``rank``, ``rank_slice``: common.Processes) -------------------------
    def step_generator(self, step: int, micro: int) -> torch.Generator:
        """The same on every rank: draws global quantities (prompts, noise, the ReFL step)."""
        return make_generator(self.recipe.seed, "step", step, micro)

    def rank_generator(self, step: int, micro: int, purpose: str) -> torch.Generator:
        """Different on every rank: for per-sample randomness that is not shared."""
        return make_generator(self.recipe.seed, purpose, step, micro, self.rank)

    def sample_prompts(self, rng: torch.Generator, per_rank: int) -> list[str]:
        idx = torch.randint(0, len(self.prompts), (per_rank * self.world,), generator=rng)
        return [self.prompts[int(i)] for i in idx[self.rank_slice(per_rank)]]

    def global_noise(self, rng: torch.Generator, per_rank: int) -> Tensor:
        shape = (per_rank * self.world, *self.gen.latent_shape(self.recipe.model.resolution))
        return torch.randn(shape, generator=rng)[self.rank_slice(per_rank)].to(self.accelerator.device)

    def pretrain_pool(self, cfg: PretrainLossConfig, size: int = 64) -> SamplePool:
        """Latents for the pre-training loss at the recipe's resolution: base-model samples (LoRA disabled, drawn
        a training micro-batch at a time) or a latents file."""
        resolution = self.recipe.model.resolution
        if cfg.source == "data":
            from safetensors.torch import load_file

            latents = load_file(cfg.data)["latents"]
            expected = self.gen.latent_shape(resolution)
            if tuple(latents.shape[1:]) != tuple(expected):
                raise ValueError(f"refl.pretrain.data {cfg.data!r}: latents of shape {tuple(latents.shape[1:])}, "
                                 f"expected {tuple(expected)} (model.resolution {resolution})")
            prompts = Path(cfg.data).with_suffix(".txt").read_text().splitlines()
            return SamplePool(latents.to(self.accelerator.device), prompts)
        from rlkit.models.lora import use_adapter
        from rlkit.rollout import sample

        rng = make_generator(self.recipe.seed, "pretrain-pool", self.rank)
        prompts = [self.prompts[int(i)] for i in torch.randint(0, len(self.prompts), (size,), generator=rng)]
        chunk = self.recipe.refl.batch_size
        with use_adapter(self.gen.transformer, None):
            latents = torch.cat([sample(self.gen, prompts[i:i + chunk], num_steps=self.recipe.refl.num_steps,
                                        guidance_scale=self.recipe.refl.guidance_scale, generator=rng,
                                        resolution=resolution)  # the training sampler
                                 for i in range(0, size, chunk)])
        return SamplePool(latents.detach(), prompts)

    # -- one update --------------------------------------------------------------------------------------
    def accumulate(self):
        return self.accelerator.accumulate(self.model)

    def backward(self, loss: Tensor) -> None:
        """Backward unless the loss is NaN/inf (then the update is skipped and counted). After a skip, the update's
        later micro-batches do not run backward either (on every rank alike: the check is collective): under
        DeepSpeed the backward of the accumulation boundary steps the optimiser."""
        if self._skip:
            return
        if not self.guard.check(loss, self.step):
            self._skip = True
            return
        self.accelerator.backward(loss)

    def end_update(self, stats: dict[str, float]) -> None:
        """Clips, steps the optimiser and schedule, updates EMA, logs, evaluates and checkpoints."""
        skipped, self._skip = self._skip, False
        if skipped:
            common.discard_gradients(self.accelerator, self.optimizer, self.model)
            stats["skipped"] = 1.0
        else:
            stats.update(common.optimizer_step(self.accelerator, self.optimizer, self.scheduler, self.ema,
                                               self.model.parameters(), self.recipe.optim.grad_clip))
        stats["lr"] = self.scheduler.get_last_lr()[0]
        stats["time/elapsed_s"] = self.clock.elapsed()
        self.step += 1
        if self.step % self.recipe.logging.every == 0:
            stats = common.over_ranks(self.accelerator, stats)
            self.tracker.log({f"train/{k}": v for k, v in stats.items()}, step=self.step)
        every = self.recipe.eval.every
        if every and self.step % every == 0 and self.step < self.total_updates:
            self.evaluate()
        common.checkpoint_or_stop(self.step, self.recipe.checkpoint.every, self.guard, self.save,
                                  close=(self.tracker, self.guard), boundary=self.checkpoint_boundary)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_updates or self.stopped_early

    # -- evaluation, checkpoints, export -----------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        with common.ema_weights(self.ema):
            self.model.eval()
            result = self.evaluator.run(self.gen, self.step, out_dir=self.run_dir if self.accelerator.is_main_process
                                        else None, shard=self.shard())
            self.model.train()
        metrics = dict(result.metrics, **{"time/elapsed_s": self.clock.elapsed()})
        self.tracker.log(metrics, step=self.step)
        self.last_metrics = metrics
        if self.evaluator.should_stop:
            self.stopped_early = True
            self.tracker.log({"eval/early_stopped": 1.0}, step=self.step)
        return metrics

    def save(self) -> Path:
        self.saved_step = self.step
        return common.save_training_state(self.checkpoints, self.accelerator, self.step, scheduler=self.scheduler,
                                          ema=self.ema, guard=self.guard, evaluator=self.evaluator.state_dict(),
                                          clock=self.clock, reward=self.reward.running_state())

    def _resume(self) -> None:
        extra = common.load_training_state(self.checkpoints, self.accelerator, scheduler=self.scheduler,
                                           ema=self.ema, guard=self.guard, clock=self.clock)
        if extra is None:
            return
        self.step = self.saved_step = int(extra["step"])
        self.evaluator.load_state_dict(extra["evaluator"])
        self.reward.load_running_state(extra.get("reward", {}))
        self.stopped_early = self.evaluator.should_stop  # a run that stopped early stays stopped
        self.tracker.log({"resumed_from": float(self.step)}, step=self.step)

    def finish(self) -> dict[str, float]:
        evaluated = self.evaluator.history[-1].step != self.step
        metrics = self.evaluate() if evaluated else self.last_metrics
        # the final checkpoint holds the final evaluation (a run resumed from it does not evaluate again); a second
        # save of a step replaces the first only once it is complete
        if self.saved_step != self.step or evaluated:
            self.save()
        self.accelerator.wait_for_everyone()
        self.export()
        self.tracker.close()
        self.guard.close()
        return metrics

    def export(self) -> Path | None:
        """The policy (EMA weights when enabled) for diffusers; called on every rank, written by the main one."""
        from rlkit.export import export_full_transformer, export_policy_lora

        model = self.accelerator.unwrap_model(self.model)
        recipe_file = self.run_dir / "recipe.yaml"
        out = self.run_dir / "export"
        if self.recipe.lora.enabled:  # float32 values, whatever precision the module runs in
            weights = common.trainable_weights(model, self.ema)
            if not self.accelerator.is_main_process:
                return None
            return export_policy_lora(model, self.recipe.lora.adapter_name, out, recipe_file, weights=weights)
        with common.ema_weights(self.ema), gathered(p for p in model.parameters() if p.requires_grad):
            if not self.accelerator.is_main_process:
                return None
            return export_full_transformer(model, out, recipe_file)
