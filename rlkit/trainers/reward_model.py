"""DiNa-LRM training (``algorithm: reward_model``) on cached latent preference pairs.

One optimiser step, top to bottom:

1. a *global* batch of pairs from one shape bucket (``BucketBatchSampler``, seeded), each process takes its
   slice, so the data does not depend on the number of processes;
2. per pair one noise level ``sigma`` (uniform / logit-normal / mode / constant / power / beta, drawn for the
   global batch and snapped to the scheduler's sigma table or continuous) and one ``eps``, drawn from its row's
   own stream and shared by the chosen and the rejected latent: ``x = (1 - sigma) x0 + sigma eps``;
3. both latents scored in one forward (with ``adversarial_eps`` > 0, beside both moved against the model,
   :func:`adversarial_latents`), loss from the DiNa-LRM family (noise-calibrated Thurstone fidelity by
   default), backward under accelerate (DDP or DeepSpeed ZeRO-2/3);
4. clip (DeepSpeed clips inside its engine), AdamW step, warmup + schedule, EMA of the trainable weights.

Evaluation (pairwise accuracy per noise level on the held-out pairs, :func:`rlkit.eval_reward.evaluate_pairwise`)
and every export use the EMA weights; exports have the release's layout (``config.json`` +
``checkpoint/backbone_lora/`` + ``checkpoint/rm_head.pt``) and load with ``rewards.build("dina-lrm",
pretrained=...)``: ``final/`` at the end, and ``checkpoints/step_N/reward_model/`` in every checkpoint.

Checkpoints are the policy trainers' (:mod:`rlkit.runtime.checkpoint`, written atomically every
``checkpoint.every`` steps, at the end and on SIGTERM, the newest ``checkpoint.keep_last`` kept): the prepared
model and optimiser with the RNG states (``accelerator.save_state``), schedule, EMA, and the data position
(epoch and global batches taken in it). The noise levels come from generators derived from ``(seed, step,
micro-batch)``, each ``eps`` from ``(seed, step, micro-batch, row of the global batch)`` and the batch order from
``(seed, epoch)``, so with ``checkpoint.resume`` a run
continues from the newest complete checkpoint bit-identically to one that was never stopped.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.base import Reward, RewardInput, RewardOutput, TextConditioning
from rlkit.config import Recipe, RewardModelConfig, source_list
from rlkit.confload import package_path
from rlkit.data import BucketBatchSampler, LoadOptions, PreferencePair, collate_pairs, load_pairs, shape_key
from rlkit.evaluate import Shard
from rlkit.runtime.accelerator import build_accelerator, full_weights_loading, gathered, uses_deepspeed, zero_stage
from rlkit.runtime.seeding import derive_seed, make_generator
from rlkit.trainers import common

SCHEME_DEFAULTS: dict[str, dict[str, float]] = {
    "uniform": {},
    "logit_normal": {"mean": 0.0, "std": 1.0},
    "mode": {"scale": 1.29},
    "constant": {"value": 0.0},
    "power": {"power": 1.0},  # U^p: p > 1 leans to low noise, p < 1 to high
    "beta": {"alpha": 1.0, "beta": 1.0},
}
TRAINABLE_TO_ARCH = {  # RewardModelConfig.trainable -> DiNaLRMConfig fields (decide the checkpoint layout)
    "lora_head": {"use_lora": True, "freeze_backbone": False},
    "head": {"use_lora": False, "freeze_backbone": True},
    "full": {"use_lora": False, "freeze_backbone": False},
}
FINAL_DIR = "final"
CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "reward_model"  # the release-layout EMA weights inside each checkpoint folder


# --------------------------------------------------------------------------------------------------
# pure pieces


def sample_noise_levels(scheme: str, n: int, generator: torch.Generator, args: dict[str, float] | None = None
                        ) -> Tensor:
    """``n`` levels in [0, 1] from ``scheme`` (the release's schemes and parameter meanings)."""
    if scheme not in SCHEME_DEFAULTS:
        raise ValueError(f"timestep_sampling: unknown scheme {scheme!r}; expected one of {sorted(SCHEME_DEFAULTS)}")
    extra = set(args or {}) - set(SCHEME_DEFAULTS[scheme])
    if extra:
        raise ValueError(f"timestep_args: {sorted(extra)} do not apply to {scheme!r} "
                         f"(its arguments: {sorted(SCHEME_DEFAULTS[scheme]) or 'none'})")
    a = {**SCHEME_DEFAULTS[scheme], **(args or {})}
    if scheme == "uniform":
        u = torch.rand(n, generator=generator)
    elif scheme == "logit_normal":
        u = torch.sigmoid(a["mean"] + a["std"] * torch.randn(n, generator=generator))
    elif scheme == "mode":  # SD3's mode sampling
        x = torch.rand(n, generator=generator)
        u = 1 - x - a["scale"] * (torch.cos(math.pi * x / 2) ** 2 - 1 + x)
    elif scheme == "constant":
        u = torch.full((n,), float(a["value"]))
    elif scheme == "power":
        u = torch.rand(n, generator=generator) ** a["power"]
    else:  # beta: numpy draws it, seeded from the torch generator (torch's Beta takes no generator)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        u = torch.from_numpy(np.random.default_rng(seed).beta(a["alpha"], a["beta"], n)).float()
    return u.clamp(0.0, 1.0)


def pair_loss(name: str, s_pos: Tensor, s_neg: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
    """Mean preference loss of a batch; ``labels`` (B,) are P(chosen preferred): 1, or 0.5 for a kept tie."""
    from rewards.dina_lrm.losses import BT_MARGIN, preference_loss, thurstone_calibrated_loss, thurstone_fixed_loss

    if bool((labels == 1).all()):
        return preference_loss(name, s_pos, s_neg, sigma)
    if name in ("thurstone_calibrated", "nll_calibrated"):
        form = "fidelity" if name == "thurstone_calibrated" else "nll"
        return thurstone_calibrated_loss(s_pos, s_neg, sigma, label=labels, form=form)
    if name == "thurstone_fixed":
        return thurstone_fixed_loss(s_pos, s_neg, label=labels)
    # Bradley-Terry: y softplus(m - d) + (1 - y) softplus(m + d), the margin asked of whichever side wins (for a tie
    # both sides, so that equal scores are best; a cross-entropy on d - m would ask the arbitrary "chosen" for m)
    d, y = s_pos.float() - s_neg.float(), labels.float()
    margin = BT_MARGIN if name == "bt_margin" else 0.0
    return (y * F.softplus(margin - d) + (1 - y) * F.softplus(margin + d)).mean()


def adversarial_latents(score: Callable[[Tensor], Tensor], latents: Tensor, eps: float,
                        loss_of: Callable[[Tensor], Tensor]) -> Tensor:
    """``latents`` moved by ``eps`` (RMS per latent) along the gradient of ``loss_of(score(latents))``.

    One normalised gradient step: the nearby latents the current model ranks worst. Training on them as well
    (``reward_model.adversarial_eps``) is adversarial training; it costs one more forward and backward per
    micro-batch. ReFL follows the reward's gradient, and a model trained only on clean pairs has directions
    that raise its score without what the labels prefer. In a Shapes world with a sharper decoder than the
    shipped one (issue #8), ReFL with ``kl_beta`` 3 gained +0.107 / +0.140 / +0.114 in 50 steps (seeds 0 / 1 / 2)
    with a DiNa-LRM trained at eps 0.02, and +0.026 (seed 0) with one trained on the same pairs without it.
    """
    probe = latents.detach().requires_grad_(True)
    with torch.enable_grad():
        grad, = torch.autograd.grad(loss_of(score(probe)), probe)
    rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
    return (latents + eps * grad / rms.view(-1, *[1] * (grad.ndim - 1))).detach()


# --------------------------------------------------------------------------------------------------
# the reward model as a reward (for evaluation)


class _TrainedReward(Reward):
    """The model under training seen through the reward interface: scores a state at its own sigma."""

    space = "latent"
    noise_aware = True
    differentiable = True

    def __init__(self, model, encode_text):
        super().__init__()
        self._parts = (model, encode_text)  # a tuple: not registered as a submodule

    def forward(self, batch: RewardInput) -> RewardOutput:
        model, encode_text = self._parts
        text = batch.text if batch.text is not None else encode_text(batch.prompts)
        return RewardOutput(scores=model.score(batch.latents, batch.clean_sigmas().float(), text))


# --------------------------------------------------------------------------------------------------
# the run


@dataclass
class RewardModelRun(common.Processes):
    recipe: Recipe
    accelerator: Any
    gen: Any  # SD3Generator (text encoders; its transformer's first blocks are the backbone)
    model: Any  # DiNaLRM (unwrapped)
    engine: Any  # what accelerate.prepare returned (DDP / DeepSpeed engine / the model)
    optimizer: Any
    scheduler: Any
    ema: Any  # rlkit.runtime.ema.EMA or None
    tracker: Any  # rlkit.runtime.tracking.Tracker
    params: list[torch.nn.Parameter]
    train_pairs: list[PreferencePair]
    eval_pairs: list[PreferencePair]
    sampler: BucketBatchSampler
    total_steps: int
    run_dir: Path
    checkpoints: Any  # rlkit.runtime.checkpoint.CheckpointManager
    guard: Any  # rlkit.runtime.guards.TrainingGuard (SIGTERM: checkpoint and stop)
    step: int = 0
    epoch: int = 0  # data position: the sampler's epoch and the global batches taken from it so far
    batches_taken: int = 0
    saved_step: int = -1  # the step of the newest checkpoint this run wrote or resumed from
    history: list[dict[str, Any]] = field(default_factory=list)
    clock: common.Stopwatch = field(default_factory=common.Stopwatch)

    @property
    def cfg(self) -> RewardModelConfig:
        return self.recipe.reward_model


def _load(sources: str | list[str], cfg: RewardModelConfig, what: str, gen) -> list[PreferencePair]:
    """Every pair of ``sources``, concatenated. ``shapes:drawn:<pairs>`` draws Shapes pictures and encodes
    them with ``gen``'s VAE, ``shapes:generated:<samples>`` samples ``gen`` and labels every within-prompt pair
    (:mod:`rlkit.shapes.preferences`); the rest go through ``load_pairs``."""
    from rlkit.cache_latents import check_vae_factors
    from rlkit.shapes.preferences import is_shapes_source, shapes_source_pairs

    data = cfg.data
    pairs: list[PreferencePair] = []
    for source in source_list(sources):
        if is_shapes_source(source):
            try:
                found = shapes_source_pairs(gen, source, cache_dir=data.cache_dir)
            except ValueError as exc:
                raise ValueError(f"reward_model.data.{what}: {exc}") from None
        else:
            found = load_pairs(source, LoadOptions(format=data.format, columns=dict(data.columns),
                                                   max_pairs_per_prompt=data.max_pairs_per_prompt))
            check_vae_factors(found, gen.vae.config)
        if not found:
            raise ValueError(f"reward_model.data.{what}: {source!r} holds no pairs")
        pairs.extend(found)
    odd = next((p for p in pairs if p.kind != "latent"), None)
    if odd is not None:
        raise odd.error("reward-model training reads latents; encode the images once with `rlkit cache-latents`", 0)
    return pairs


def _report_left_out(sampler: BucketBatchSampler, accelerator) -> None:
    """Says what the shape buckets leave out of each epoch: a batch holds one latent shape, so a bucket's remainder
    sits out, and a bucket smaller than a global batch is never trained on."""
    left = sampler.left_out()
    if not left or not accelerator.is_main_process:
        return
    never = {key: n for key, (_, n) in left.items() if n < sampler.batch_size}
    total = sum(len(idx) for idx in sampler.buckets.values())
    print(f"[rlkit] reward_model: {sum(k for k, _ in left.values())} of {total} pairs sit out each epoch (what "
          f"fills no global batch of {sampler.batch_size} in its latent-shape bucket)", flush=True)
    if never:
        warnings.warn(f"reward_model: {sum(never.values())} pairs in {len(never)} latent-shape bucket(s) smaller "
                      f"than a global batch of {sampler.batch_size} are never trained on: "
                      + ", ".join(f"{key} ({n})" for key, n in never.items()), stacklevel=2)


def held_out_sample(pairs: list, limit: int | None, seed: int) -> list:
    """``limit`` of ``pairs``, drawn at random (seeded) and kept in their order; all of them without a limit. Not
    the first ``limit``: a cached set is ordered by bucket, and its first pairs are its smallest pictures."""
    if limit is None or limit >= len(pairs):
        return pairs
    keep = sorted(random.Random(derive_seed(seed, "eval_limit")).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def _build_model(recipe: Recipe, gen):
    from rewards.dina_lrm import DiNaLRM, DiNaLRMConfig, load_dina_lrm

    cfg = recipe.reward_model
    if cfg.init_from:
        model = load_dina_lrm(cfg.init_from, gen.transformer, share=False)
        mode = {"lora": "lora_head", "head": "head", "full": "full"}[model.config.save_mode]
        if mode != cfg.trainable:
            raise ValueError(f"reward_model.trainable={cfg.trainable!r} but {cfg.init_from} was saved as {mode!r}")
    else:
        arch = DiNaLRMConfig.from_dict({**cfg.model, **TRAINABLE_TO_ARCH[cfg.trainable]})
        model = DiNaLRM.build(arch, gen.transformer, share=False)
    model.set_trainable(lora=cfg.trainable == "lora_head", head=True, backbone=cfg.trainable == "full")
    model.gradient_checkpointing = recipe.model.gradient_checkpointing  # the copied blocks recompute in backward
    # the checkpoint names the generator it was trained on, which scores with it when no base model is given
    model.config = replace(model.config, backbone_model_id=package_path(recipe.model.pretrained), extra={
        **model.config.extra, "rlkit_recipe": package_path(recipe.to_dict()),
        "training": {**dict(model.config.extra.get("training") or {}), "ema_decay": recipe.ema.decay,
                     "use_ema": recipe.ema.enabled, "t_weighting_scheme": cfg.timestep_sampling,
                     "learning_rate": recipe.optim.lr, "warmup_steps": recipe.optim.warmup_steps}})
    return model.train()


def setup(recipe: Recipe) -> RewardModelRun:
    """Accelerator, generator (text encoders + backbone), model, data, optimiser, EMA; resumed from the newest
    complete checkpoint when ``checkpoint.resume`` is set and there is one."""
    from rlkit.runtime.ema import EMA
    from rlkit.runtime.guards import TrainingGuard

    cfg = recipe.reward_model
    accelerator = build_accelerator(recipe.launch, grad_clip=recipe.optim.grad_clip, grad_accum=cfg.grad_accum,
                                    micro_batch=cfg.batch_size)
    run_dir = common.run_dir(recipe)
    checkpoints, tracker = common.open_run_folder(recipe, accelerator, CHECKPOINT_DIR)  # before any weights load
    # whole on every rank (ZeRO-3 partitions only what ``prepare`` gets: the model). shapes:generated sources
    # sample the whole generator, before the model's adapter joins its first N blocks (so that a cache of them
    # matches the generator's own weights); then the model holds the embedders and those blocks, and the rest
    # is freed
    with full_weights_loading(accelerator):
        gen = common.load_generator(recipe.model, device=accelerator.device)
        train_pairs = _load(cfg.data.train, cfg, "train", gen)
        eval_pairs = held_out_sample(_load(cfg.data.eval, cfg, "eval", gen), cfg.eval_limit, recipe.seed) \
            if cfg.data.eval else []
        torch.manual_seed(derive_seed(recipe.seed, "init"))  # same head init on every rank
        model = _build_model(recipe, gen)
    gen.transformer = None
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.launch.mixed_precision != "no" and not uses_deepspeed(accelerator):
        # fp32 master weights for what AdamW updates; autocast runs the bf16/fp16 backbone with them
        # (DeepSpeed keeps its own fp32 copy instead)
        for p in params:
            p.data = p.data.float()
    world = accelerator.num_processes
    sampler = BucketBatchSampler([shape_key(p) for p in train_pairs], cfg.batch_size * world,
                                 seed=derive_seed(recipe.seed, "data"), drop_last=True)
    _report_left_out(sampler, accelerator)
    if len(sampler) < cfg.grad_accum:
        raise ValueError(f"reward_model: {len(train_pairs)} pairs give {len(sampler)} global batches of "
                         f"{cfg.batch_size} x {world} processes; fewer than grad_accum={cfg.grad_accum}")
    total = cfg.epochs * (len(sampler) // cfg.grad_accum) if cfg.epochs else cfg.max_steps
    optimizer, scheduler = common.build_optimizer(params, recipe.optim, total)
    engine, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(params, recipe.ema.decay, recipe.ema.update_every) if recipe.ema.enabled else None
    run = RewardModelRun(recipe, accelerator, gen, model, engine, optimizer, scheduler, ema, tracker, params,
                         train_pairs, eval_pairs, sampler, total, run_dir, checkpoints, TrainingGuard())
    if recipe.checkpoint.resume:
        _resume(run)
    tracker.start_progress(total, initial=run.step, desc=recipe.name)
    return run


# --------------------------------------------------------------------------------------------------
# one step


def _global_batches(run: RewardModelRun) -> Iterator[tuple[int, list[int]]]:
    """``(epoch, global batch indices)`` forever, reshuffled per epoch, from the run's data position (which it
    advances: a checkpoint holds where the next batch comes from)."""
    while True:
        run.sampler.set_epoch(run.epoch)
        for i, batch in enumerate(run.sampler):
            if i < run.batches_taken:
                continue
            run.batches_taken = i + 1
            yield run.epoch, batch
        run.epoch, run.batches_taken = run.epoch + 1, 0


def _micro_step(run: RewardModelRun, global_idx: list[int], micro: int) -> dict[str, float]:
    cfg = run.cfg
    device = run.accelerator.device
    g = make_generator(run.recipe.seed, "pairs", run.step, micro)  # same on every rank: draws for the global batch
    n_global = len(global_idx)
    u = sample_noise_levels(cfg.timestep_sampling, n_global, g, cfg.timestep_args)
    sigma_all = run.model.snap(u.to(device)).cpu() if cfg.snap_to_grid else u
    mine = run.rank_slice(cfg.batch_size)
    batch = collate_pairs([run.train_pairs[i] for i in global_idx[mine]])
    # one stream per row of the global batch: each rank draws its own rows only, as any process count would
    eps = torch.stack([torch.randn(batch.chosen.shape[1:], generator=make_generator(
        run.recipe.seed, "pair_noise", run.step, micro, row)) for row in range(n_global)[mine]]).to(device)
    sigma = sigma_all[mine].to(device)
    s = sigma.reshape(-1, 1, 1, 1)
    noisy = torch.cat([(1 - s) * batch.chosen.to(device) + s * eps, (1 - s) * batch.rejected.to(device) + s * eps])
    text = run.gen.encode_prompts(batch.prompts)
    text = TextConditioning.cat([text, text])
    t = 1000.0 * torch.cat([sigma, sigma])
    labels = batch.labels.to(device)

    def loss_of(scores: Tensor) -> Tensor:
        return pair_loss(cfg.loss, *scores.chunk(2), sigma, labels)

    def accuracy_of(scores: Tensor) -> float:
        chosen, rejected = scores.detach().chunk(2)
        return float((chosen > rejected).float().mean())

    if cfg.adversarial_eps > 0:
        # the unwrapped model: an input gradient through DeepSpeed's engine would fire its gradient-reduction hooks
        attacked = adversarial_latents(lambda z: run.model(z, t, text), noisy, cfg.adversarial_eps, loss_of)
        scores, attacked_scores = run.engine(torch.cat([noisy, attacked]), torch.cat([t, t]),
                                             TextConditioning.cat([text, text])).chunk(2)
        loss = 0.5 * (loss_of(scores) + loss_of(attacked_scores))
        extra = {"adversarial_accuracy": accuracy_of(attacked_scores)}
    else:
        scores = run.engine(noisy, t, text)
        loss, extra = loss_of(scores), {}
    s_pos, s_neg = scores.detach().chunk(2)
    run.accelerator.backward(loss)
    return {"loss": float(loss.detach()), "accuracy": accuracy_of(scores), "sigma_mean": float(sigma.mean()),
            "margin": float((s_pos - s_neg).mean()), **extra}


def _optimizer_step(run: RewardModelRun) -> dict[str, float]:
    """Clips (unless DeepSpeed does), steps, schedules, updates EMA; returns the lr this step used."""
    lr = float(run.optimizer.param_groups[0]["lr"])
    return {"lr": lr, **common.optimizer_step(run.accelerator, run.optimizer, run.scheduler, run.ema, run.params,
                                              run.recipe.optim.grad_clip)}


def _log(run: RewardModelRun, record: dict[str, Any]) -> None:
    run.history.append({"step": run.step, **record})
    run.tracker.log(record, step=run.step)


# --------------------------------------------------------------------------------------------------
# evaluation and checkpoints (EMA weights)


def ema_weights(run: RewardModelRun):
    return common.ema_weights(run.ema)


def evaluate(run: RewardModelRun, levels: list[float] | None = None, pairs: list[PreferencePair] | None = None,
             batch_size: int | None = None) -> dict[str, float]:
    """Held-out pairwise accuracy per noise level (EMA weights; chosen and rejected share eps)."""
    from rlkit.eval_reward import evaluate_pairwise

    pairs = run.eval_pairs if pairs is None else pairs
    levels = list(run.cfg.eval_levels if levels is None else levels)
    if not pairs:
        return {}
    reward = _TrainedReward(run.model, run.gen.encode_prompts)
    with ema_weights(run):
        run.model.eval()
        # each rank scores its share, except under ZeRO-3, whose forward passes every rank must run together
        report = evaluate_pairwise(reward, pairs, levels=levels, include_clean=False,
                                   batch_size=batch_size or run.cfg.eval_batch_size,
                                   seed=derive_seed(run.recipe.seed, "eval"), device=run.accelerator.device,
                                   progress=False, shard=Shard() if zero_stage(run.accelerator) == 3 else run.shard())
        run.model.train()
    metrics = {}
    for row in report.results:
        metrics[f"eval/accuracy_{row.setting}"] = row.accuracy
        metrics[f"eval/accuracy_ties_half_{row.setting}"] = row.accuracy_ties_half
    return metrics


def export(run: RewardModelRun, folder: Path) -> Path:
    """The EMA weights in the release's layout, written by the main process; every process calls it (under ZeRO-3
    each rank holds a shard of what is saved, gathered here). The trained weights are written in float32 (the
    EMA's average, or DeepSpeed's fp32 masters), whatever precision the module runs in."""
    from rewards.dina_lrm import save_dina_lrm

    weights = common.trainable_weights(run.model, run.ema)
    saved = run.model.parameters() if run.model.config.save_mode == "full" else run.params
    with gathered(saved):
        if run.accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
            save_dina_lrm(run.model, folder, weights=weights)
    run.accelerator.wait_for_everyone()
    return folder


def save(run: RewardModelRun) -> Path:
    """A resumable checkpoint of the run (every process calls it), with the EMA export inside.

    The export is written beside the checkpoint first and moved in: it gathers on every rank, and the checkpoint's
    ``write`` runs on the main one only.
    """
    from rlkit.runtime.checkpoint import TMP_SUFFIX, step_dir_name

    data = {"epoch": run.epoch, "batches_taken": run.batches_taken, "pairs": len(run.train_pairs),
            "batches_per_epoch": len(run.sampler)}
    staged = export(run, run.checkpoints.directory / f"{step_dir_name(run.step)}_{EXPORT_DIR}{TMP_SUFFIX}")
    folder = common.save_training_state(run.checkpoints, run.accelerator, run.step, scheduler=run.scheduler,
                                        ema=run.ema, guard=run.guard, data=data,
                                        clock=run.clock,
                                        write=lambda tmp: os.replace(staged, tmp / EXPORT_DIR))
    run.saved_step = run.step
    return folder


def _resume(run: RewardModelRun) -> None:
    extra = common.load_training_state(run.checkpoints, run.accelerator, scheduler=run.scheduler, ema=run.ema,
                                       guard=run.guard, clock=run.clock)
    if extra is None:
        return
    data = extra["data"]
    now = {"pairs": len(run.train_pairs), "batches_per_epoch": len(run.sampler)}
    if any(data[k] != v for k, v in now.items()):
        raise ValueError(f"cannot resume from {extra['path']}: it was written for {data['pairs']} training pairs in "
                         f"{data['batches_per_epoch']} global batches per epoch, the run now has {now['pairs']} in "
                         f"{now['batches_per_epoch']}; change the data back or set checkpoint.resume=false")
    run.step = run.saved_step = int(extra["step"])
    run.epoch, run.batches_taken = int(data["epoch"]), int(data["batches_taken"])
    _log(run, {"resumed_from": float(run.step)})


# --------------------------------------------------------------------------------------------------
# the loop


def train_loop(run: RewardModelRun) -> None:
    cfg = run.cfg
    batches = _global_batches(run)
    while run.step < run.total_steps:
        micro_stats = []
        for micro in range(cfg.grad_accum):
            epoch, idx = next(batches)
            with run.accelerator.accumulate(run.engine):
                micro_stats.append(_micro_step(run, idx, micro))
        record = common.over_ranks(run.accelerator, {k: float(np.mean([m[k] for m in micro_stats]))
                                                     for k in micro_stats[0]})  # global-batch means
        record.update(_optimizer_step(run), epoch=epoch)
        run.step += 1
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total_steps:
            record.update(evaluate(run))
        if run.step % run.recipe.logging.every == 0 or any(k.startswith("eval/") for k in record):
            record["time/elapsed_s"] = run.clock.elapsed()
            _log(run, record)
        common.checkpoint_or_stop(run.step, run.recipe.checkpoint.every, run.guard, lambda: save(run),
                                  close=(run.tracker, run.guard))


def finish(run: RewardModelRun) -> dict[str, float]:
    if run.saved_step != run.step:  # before the evaluation: a failing evaluation loses no training
        save(run)
    metrics = evaluate(run)
    if metrics:
        _log(run, metrics)
    export(run, run.run_dir / FINAL_DIR)
    run.tracker.close()
    run.guard.close()
    return {"steps": float(run.step), **metrics}


def train(recipe: Recipe) -> dict[str, float]:
    run = setup(recipe)
    train_loop(run)
    return finish(run)
