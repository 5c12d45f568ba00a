"""Flow-GRPO and Flow-GRPO-Fast (``algorithm: flow_grpo``): online RL with group-relative advantages.

One epoch, on every process at once:

1. **Layout.** ``prompts_per_epoch`` prompts are drawn and each is repeated ``group_size`` times; the list is
   shuffled with a seed shared by every rank and cut into equal per-rank slices (a group may span ranks), then
   into rollout batches of ``batch_size``. Each image has a global index; its initial noise and SDE noise come
   from its own generator, and each batch's SDE window from a generator keyed by its global batch index, so a
   run draws the same images whatever the number of processes.
2. **Rollout** (no grad, current policy): SDE (``sde`` or ``cps``) inside a window of ``window_size`` steps
   whose start is drawn from ``window_start_range``, Euler elsewhere; only the window transitions are stored
   (:class:`rlkit.rollout.Rollout`). Window = all steps is plain Flow-GRPO.
3. **Rewards** on latents (a latent reward never decodes; pixel rewards decode through a memoised VAE call):
   the final clean latent (``reward_at: final``), or the state right after the window at its own sigma, the
   remaining ODE steps skipped (``reward_at: window_end``; needs a noise-aware reward).
4. **Advantages** from the rewards of *all* ranks (gathered): per-prompt mean, per-prompt or global std,
   clipped; several rewards mix as one weighted reward or as a weighted sum of per-reward advantages
   (``reward_mix``). Groups without signal (all rewards equal) are dropped from the loss.
5. **Update**: ``inner_epochs x updates_per_epoch`` optimiser updates; each is one backward per (batch,
   trained window step) of the clipped-ratio loss plus ``kl_beta`` x the KL to the reference policy (the
   same transformer with the LoRA disabled). Accumulation follows from the recipe and the world size.

Dropped groups: their advantages are exactly 0, so their policy term vanishes; the loss is divided by the
global share of informative samples, which makes the update the mean over informative samples only, while
every rank keeps the same batches and backward calls (DeepSpeed and DDP need that) and training batches stay
the rollout batches (SD3 outputs depend on the batch size; on-policy ratios are then exactly 1).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

from rewards.base import Reward, RewardInput
from rlkit.config import FlowGRPOConfig, LoRAConfig, Recipe
from rlkit.grpo import clipped_policy_loss, informative_mask, kl_to_reference, mixed_advantages
from rlkit.models.decode import decode_if_needed
from rlkit.rollout import Rollout, draw_window, rollout, step_log_probs
from rlkit.runtime.seeding import derive_seed
from rlkit.trainers.common import reference_context, require_noise_aware

MIXED_REWARD = "reward"  # key of the (weighted) training reward in the per-epoch score tables
MIN_INFORMATIVE = 1e-12  # below this share of informative samples the update carries no policy signal


# -- batch arithmetic ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EpochPlan:
    """How one epoch splits over processes, batches and optimiser updates (all derived, never configured)."""

    world: int
    images_per_rank: int  # prompts_per_epoch * group_size / world
    batches_per_rank: int  # rollout (= training) batches of batch_size images per rank
    batches_per_update: int  # batches_per_rank / updates_per_epoch
    train_steps: int  # trained window steps per batch
    grad_accum: int  # backward calls per optimiser update: batches_per_update * train_steps
    updates_per_epoch: int  # inner_epochs * updates_per_epoch

    @property
    def images_per_epoch(self) -> int:
        return self.images_per_rank * self.world


def trained_positions(cfg: FlowGRPOConfig, window_start: int) -> list[int]:
    """Positions in the window that are trained: all but the grid's last step, unless ``train_last_step``."""
    last = cfg.num_steps - 1
    return [j for j in range(cfg.window_size) if cfg.train_last_step or window_start + j != last]


def plan_epoch(cfg: FlowGRPOConfig, world: int) -> EpochPlan:
    """The epoch's arithmetic for ``world`` processes; raises naming the recipe keys that do not divide."""
    per_rank, batches = cfg.split(world)
    steps = len(trained_positions(cfg, cfg.window_start_range[0]))
    if steps == 0:
        raise ValueError("flow_grpo: the window trains no step (a 1-step window on the last step); widen "
                         "flow_grpo.window_size or set flow_grpo.train_last_step")
    per_update = batches // cfg.updates_per_epoch
    return EpochPlan(world=world, images_per_rank=per_rank, batches_per_rank=batches, batches_per_update=per_update,
                     train_steps=steps, grad_accum=per_update * steps,
                     updates_per_epoch=cfg.inner_epochs * cfg.updates_per_epoch)


# -- the epoch's data ---------------------------------------------------------------------------------------
@dataclass
class EpochData:
    """This rank's rollouts and advantages for one epoch."""

    batches: list[Rollout]  # batches_per_rank rollouts; group_ids are global prompt slots
    sample_ids: list[Tensor]  # per batch (B,) global image indices
    advantages: list[Tensor]  # per batch (B,)
    keep: list[Tensor]  # per batch (B,) float: 1 for images of informative groups
    informative: float  # global share of informative images (the loss normaliser)
    stats: dict[str, float] = field(default_factory=dict)
    all_advantages: Tensor | None = None  # (N,) every image of the epoch, by global index (all ranks)
    all_scores: dict[str, Tensor] = field(default_factory=dict)  # (N,) per reward (and MIXED_REWARD), by index

    @property
    def all_rewards(self) -> Tensor:
        """(N,) the training reward of every image of the epoch, by global index."""
        return self.all_scores[MIXED_REWARD]


def epoch_layout(num_prompts: int, cfg: FlowGRPOConfig, seed: int, epoch: int) -> tuple[Tensor, Tensor]:
    """Global ``(prompt_index, group_id)`` per image of the epoch, shuffled; identical on every rank.

    Prompts are drawn without replacement while the pool lasts (upstream's repeat sampler); group ids are
    the prompt slots ``0..prompts_per_epoch-1``.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, "flow_grpo/prompts", epoch))
    slots = cfg.prompts_per_epoch
    picks = torch.cat([torch.randperm(num_prompts, generator=g) for _ in range(-(-slots // num_prompts))])[:slots]
    groups = torch.arange(slots).repeat_interleave(cfg.group_size)
    order = torch.randperm(groups.numel(), generator=g)
    return picks[groups[order]], groups[order]


def _component_scores(reward: Reward, out) -> dict[str, Tensor]:
    """Per-component scores of a ``weighted`` mixture (what ``reward_mix: advantage`` normalises)."""
    keys = getattr(reward, "keys", None)
    if keys is None:
        return {}
    return {key: out.extras[f"{key}/normalized"].detach().float() for key in keys}


def _advantage_weights(reward: Reward, cfg: FlowGRPOConfig) -> dict[str, float] | None:
    if cfg.reward_mix == "reward":
        return None
    keys = getattr(reward, "keys", None)
    if keys is None:
        return {MIXED_REWARD: 1.0}
    return dict(zip(keys, reward.weights))


@torch.no_grad()
def score_rollout(gen, reward: Reward, ro: Rollout, cfg: FlowGRPOConfig, generator: torch.Generator) -> dict:
    """The reward of each image: on the final latents, or on the window-end state at its own sigma."""
    if cfg.reward_at == "final":
        latents = ro.final_latents
        sigmas = torch.zeros(ro.batch_size, device=latents.device)
    else:
        latents, sigmas = ro.window_end_latents, ro.window_end_sigma
    out = reward(RewardInput(prompts=ro.prompts, latents=latents, sigmas=sigmas, text=ro.text,
                             decode=decode_if_needed(gen, [reward]), generator=generator))
    scores = {MIXED_REWARD: out.scores, **_component_scores(reward, out)}
    extras = {k: v for k, v in out.extras.items() if v.ndim == 1 and v.shape[0] == ro.batch_size}
    # on the policy's device, where advantages are gathered and indexed, wherever the reward computed
    return {part: {k: v.detach().float().to(latents.device) for k, v in values.items()}
            for part, values in (("scores", scores), ("extras", extras))}


def compute_advantages(scores: dict[str, Tensor], group_ids: Tensor, cfg: FlowGRPOConfig,
                       weights: dict[str, float] | None) -> tuple[Tensor, dict[str, float]]:
    """Advantages of every image of the epoch (all ranks' rewards) and their statistics."""
    if weights is None:
        components, weights = {MIXED_REWARD: scores[MIXED_REWARD]}, {MIXED_REWARD: 1.0}
    else:
        components = {k: scores[k] for k in weights}
    unclipped = mixed_advantages(components, weights, group_ids, std=cfg.std, clip=None)
    adv = unclipped.clamp(-cfg.adv_clip, cfg.adv_clip)  # as mixed_advantages(..., clip=cfg.adv_clip)
    mask = informative_mask(adv, group_ids)
    r = scores[MIXED_REWARD]
    stats = {
        "reward/mean": r.mean().item(),
        "reward/std": r.std(correction=0).item(),
        "zero_std_fraction": 1.0 - mask.float().mean().item(),
        "adv_clip_fraction": (unclipped.abs() > cfg.adv_clip).float().mean().item(),  # of what is clamped
        "adv_abs_mean": adv.abs().mean().item(),
    }
    for name, value in scores.items():
        if name != MIXED_REWARD:
            stats[f"reward/{name}"] = value.mean().item()
    return adv, stats


def rollout_epoch(run, cfg: FlowGRPOConfig, plan: EpochPlan, epoch: int, seed: int, resolution: int) -> EpochData:
    """Rollout, rewards and (cross-rank) advantages of one epoch on this rank."""
    prompt_idx, group_ids = epoch_layout(len(run.prompts), cfg, seed, epoch)
    mine = slice(run.rank * plan.images_per_rank, (run.rank + 1) * plan.images_per_rank)
    sample_ids = torch.arange(plan.images_per_epoch)[mine]
    device = run.gen.device
    batches, ids, local_scores, extras = [], [], [], {}
    for b in range(plan.batches_per_rank):
        rows = sample_ids[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        global_batch = run.rank * plan.batches_per_rank + b
        window = draw_window(tuple(cfg.window_start_range), cfg.window_size, cfg.num_steps,
                             torch.Generator().manual_seed(derive_seed(seed, "flow_grpo/window", epoch, global_batch)))
        gens = [torch.Generator().manual_seed(derive_seed(seed, "flow_grpo/image", epoch, int(i))) for i in rows]
        ro = rollout(run.gen, [run.prompts[int(prompt_idx[i])] for i in rows], num_steps=cfg.num_steps,
                     generator=gens, window=window, method=cfg.sde, noise_level=cfg.noise_level,
                     guidance_scale=cfg.guidance_scale, resolution=resolution, transformer=run.model,
                     cps_log_prob=cfg.cps_log_prob, stop_at=window.end if cfg.reward_at == "window_end" else None)
        ro = replace(ro, group_ids=group_ids[rows].to(device))
        reward_gen = torch.Generator().manual_seed(derive_seed(seed, "flow_grpo/reward", epoch, global_batch))
        scored = score_rollout(run.gen, run.reward, ro, cfg, reward_gen)
        local_scores.append(scored["scores"])
        for key, value in scored["extras"].items():
            extras.setdefault(key, []).append(value)
        batches.append(ro)
        ids.append(rows)

    gather = _gather_fn(run)
    local_ids = torch.cat(ids).to(device)
    all_ids = gather(local_ids)
    all_scores = {k: gather(torch.cat([s[k] for s in local_scores]))[torch.argsort(all_ids)]
                  for k in local_scores[0]}
    all_groups = group_ids.to(device)  # by global image index
    adv, stats = compute_advantages(all_scores, all_groups, cfg, _advantage_weights(run.reward, cfg))
    keep_all = informative_mask(adv, all_groups).float()
    informative = keep_all.mean().item()
    stats.update({f"reward_extras/{k}": torch.cat(v).mean().item() for k, v in extras.items()})
    stats["window_start"] = sum(int(ro.step_indices[0, 0]) for ro in batches) / len(batches)
    idx = [i.to(device) for i in ids]
    return EpochData(batches=batches, sample_ids=ids, advantages=[adv[i] for i in idx], keep=[keep_all[i] for i in idx],
                     informative=informative, stats=stats, all_advantages=adv, all_scores=all_scores)


# -- the loss -----------------------------------------------------------------------------------------------
def _kl_std(out, ro: Rollout, j: int, convention: str) -> Tensor:
    """The std the KL divides by: the transition's, or upstream flow-SDE's ``std_t`` (without ``sqrt(|dt|)``)."""
    if convention == "transition" or ro.method == "cps":
        return out.std
    dt = (ro.next_sigmas[:, j] - ro.sigmas[:, j]).view(-1, *([1] * (out.std.ndim - 1)))
    return out.std / torch.sqrt(-dt)


def step_loss(gen, model, ro: Rollout, j: int, advantages: Tensor, keep: Tensor, informative: float,
              cfg: FlowGRPOConfig, reference: Callable[[], contextlib.AbstractContextManager] | None
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of window step ``j`` of one batch: clipped ratio (+ ``kl_beta`` KL), over informative images,
    and its statistics as detached 0-d tensors (read once per update: each read would wait for the accelerator).

    ``reference``: a context that turns the policy into the reference (LoRA disabled); required when
    ``kl_beta > 0``.
    """
    out = step_log_probs(gen, ro, j, transformer=model, uncond_grad=cfg.cfg_uncond_grad)
    logp_old = ro.log_probs[:, j]
    policy, pstats = clipped_policy_loss(out.log_prob, logp_old, advantages, cfg.clip_range)
    scale = 1.0 / informative if informative > MIN_INFORMATIVE else 0.0
    loss = policy
    stats = {"policy_loss": policy.detach(), "clip_fraction": pstats["clip_fraction"].detach(),
             "approx_kl": pstats["approx_kl"].detach(), "ratio_mean": pstats["ratio_mean"].detach(),
             "ratio_dev_max": (out.log_prob.detach() - logp_old).exp().sub(1).abs().max()}
    if cfg.kl_beta > 0:
        with torch.no_grad():
            ref = step_log_probs(gen, ro, j, transformer=model, context=reference)
        kl = kl_to_reference(out.mean, ref.mean, _kl_std(out, ro, j, cfg.kl_std))
        kl_term = (kl * keep).mean()
        loss = loss + cfg.kl_beta * kl_term
        stats["kl"] = kl.detach().mean()
    stats["loss"] = loss.detach() * scale
    return loss * scale, stats


def _gather_fn(run) -> Callable[[Tensor], Tensor]:
    accelerator = getattr(run, "accelerator", None)
    if accelerator is None or run.world == 1:
        return lambda t: t
    return accelerator.gather


def train_update(run, cfg: FlowGRPOConfig, plan: EpochPlan, data: EpochData, epoch: int, update: int, seed: int
                 ) -> dict[str, float]:
    """One optimiser update (``update`` counts within the epoch): backward per (batch, trained step), then step."""
    inner, part = divmod(update, cfg.updates_per_epoch)
    g = torch.Generator().manual_seed(derive_seed(seed, "flow_grpo/order", epoch, inner))
    order = torch.randperm(plan.batches_per_rank, generator=g).tolist()
    chosen = order[part * plan.batches_per_update:(part + 1) * plan.batches_per_update]
    reference = reference_context(run) if cfg.kl_beta > 0 else None
    totals: dict[str, Tensor] = {}
    calls = 0
    for b in chosen:
        ro = data.batches[b]
        start = int(ro.step_indices[0, 0])
        for j in trained_positions(cfg, start):
            with run.accumulate():
                loss, stats = step_loss(run.gen, run.model, ro, j, data.advantages[b], data.keep[b],
                                        data.informative, cfg, reference)
                run.backward(loss)
            calls += 1
            for key, value in stats.items():
                value = value.float()
                totals[key] = value if key not in totals else (
                    torch.maximum(totals[key], value) if key == "ratio_dev_max" else totals[key] + value)
    return {k: (v if k == "ratio_dev_max" else v / calls).item() for k, v in totals.items()}


# -- the trainer --------------------------------------------------------------------------------------------
def check_reward(reward: Reward, cfg: FlowGRPOConfig) -> None:
    if cfg.reward_at == "window_end":
        require_noise_aware(reward, "flow_grpo")


def train(recipe: Recipe) -> dict:
    """Runs Flow-GRPO / -Fast as the recipe says; returns the final metrics."""
    from rlkit.trainers.loop import PolicyRun

    cfg = recipe.flow_grpo
    plan = plan_epoch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    run = PolicyRun.setup(recipe, total_updates=cfg.max_epochs * plan.updates_per_epoch, micro_batch=cfg.batch_size,
                          grad_accum=plan.grad_accum, check_reward=functools.partial(check_reward, cfg=cfg))
    if run.world != plan.world:
        raise RuntimeError(f"WORLD_SIZE says {plan.world} processes but the accelerator has {run.world}")
    run.checkpoint_boundary = plan.updates_per_epoch  # checkpoints end epochs: a resume draws the next epoch afresh
    while not run.finished:
        epoch, first = divmod(run.step, plan.updates_per_epoch)
        t0 = time.perf_counter()
        data = rollout_epoch(run, cfg, plan, epoch, recipe.seed, recipe.model.resolution)
        rollout_s = time.perf_counter() - t0
        for update in range(first, plan.updates_per_epoch):
            if run.finished:
                break
            t1 = time.perf_counter()
            stats = train_update(run, cfg, plan, data, epoch, update, recipe.seed)
            stats.update(data.stats, epoch=float(epoch), informative_fraction=data.informative)
            stats["time/rollout_s"] = rollout_s
            stats["time/update_s"] = time.perf_counter() - t1
            run.end_update(stats)
    return run.finish()


# -- cost of an epoch (benchmarks) --------------------------------------------------------------------------
@dataclass
class LocalRun:
    """A one-process stand-in for :class:`~rlkit.trainers.loop.PolicyRun` (plain AdamW, no accelerator)."""

    gen: object
    model: torch.nn.Module
    reward: Reward
    prompts: list[str]
    optimizer: torch.optim.Optimizer
    grad_accum: int
    world: int = 1
    rank: int = 0
    accelerator: None = None
    step: int = 0

    def accumulate(self):
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        (loss / self.grad_accum).backward()

    def end_update(self, stats: dict[str, float]) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1


@dataclass
class EpochCost:
    """Wall-clock seconds and transformer forward calls of one epoch (rollout + rewards, and the updates)."""

    rollout_s: float
    update_s: float
    rollout_calls: int
    update_calls: int
    reward_mean: float

    @property
    def total_s(self) -> float:
        return self.rollout_s + self.update_s


class _CallCounter:
    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


def add_cost_policy(model: torch.nn.Module, lora: LoRAConfig | None = None) -> None:
    """Freezes ``model`` and adds :func:`epoch_cost`'s policy LoRA (``lora``, default rank 4) unless it has it."""
    from rlkit.models.lora import adapter_names, add_lora

    spec = lora or LoRAConfig(rank=4, alpha=8.0)
    if spec.adapter_name not in adapter_names(model):
        model.requires_grad_(False)
        add_lora(model, spec.adapter_name, rank=spec.rank, alpha=spec.alpha, target_modules=list(spec.target_modules),
                 init=spec.init)


def epoch_cost(gen, reward: Reward, cfg: FlowGRPOConfig, prompts: list[str], *, resolution: int, lr: float = 1e-4,
               lora: LoRAConfig | None = None, seed: int = 0, epoch: int = 0) -> EpochCost:
    """Times one Flow-GRPO epoch on one process: rollout + rewards + advantages, then every update.

    ``gen`` is an ``SD3Generator``; unless its transformer already carries the policy adapter
    (``lora.adapter_name``), it is frozen and a policy LoRA (``lora``, default rank 4) is added. The same code
    paths as :func:`train` run (without accelerator, evaluation or checkpoints), so the ratios between
    variants (:func:`cost_variants`) are those of the trainer.
    """
    check_reward(reward, cfg)
    model = gen.transformer
    add_cost_policy(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    plan = plan_epoch(cfg, 1)
    run = LocalRun(gen=gen, model=model, reward=reward, prompts=prompts,
                   optimizer=torch.optim.AdamW(params, lr=lr), grad_accum=plan.grad_accum)
    counter = _CallCounter(model)
    try:
        t0 = time.perf_counter()
        data = rollout_epoch(run, cfg, plan, epoch, seed, resolution)
        rollout_s, rollout_calls = time.perf_counter() - t0, counter.calls
        t1 = time.perf_counter()
        for update in range(plan.updates_per_epoch):
            stats = train_update(run, cfg, plan, data, epoch, update, seed)
            run.end_update(stats)
        update_s = time.perf_counter() - t1
    finally:
        counter.remove()
    return EpochCost(rollout_s=rollout_s, update_s=update_s, rollout_calls=rollout_calls,
                     update_calls=counter.calls - rollout_calls, reward_mean=data.stats["reward/mean"])


def cost_variants(fast: FlowGRPOConfig) -> dict[str, FlowGRPOConfig]:
    """Flow-GRPO (every step SDE and trained), -Fast (``fast`` as given) and -Fast with ``reward_at: window_end``."""
    return {
        "flow_grpo": replace(fast, window_size=fast.num_steps, window_start_range=(0, 0), reward_at="final"),
        "fast": replace(fast, reward_at="final"),
        "fast_window_end": replace(fast, reward_at="window_end"),
    }


def compare_epoch_costs(make_generator: Callable[[], object], reward: Reward, fast: FlowGRPOConfig,
                        prompts: list[str], *, resolution: int, repeats: int = 3, **kwargs) -> dict[str, dict]:
    """Epoch costs of the three variants measured side by side (interleaved repeats, medians), with the ratio
    of each total to Flow-GRPO's. ``make_generator()`` returns a fresh generator (same weights each call)."""
    variants = cost_variants(fast)
    runs: dict[str, list[EpochCost]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, cfg in variants.items():
            runs[name].append(epoch_cost(make_generator(), reward, cfg, prompts, resolution=resolution, epoch=r,
                                         **kwargs))

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    table = {}
    for name, costs in runs.items():
        table[name] = {"rollout_s": median([c.rollout_s for c in costs]),
                       "update_s": median([c.update_s for c in costs]),
                       "total_s": median([c.total_s for c in costs]),
                       "rollout_calls": costs[0].rollout_calls, "update_calls": costs[0].update_calls}
    base = table["flow_grpo"]["total_s"]
    for row in table.values():
        row["ratio_to_flow_grpo"] = row["total_s"] / base
    return table


__all__ = [
    "EpochCost", "EpochData", "EpochPlan", "LocalRun", "check_reward", "compare_epoch_costs",
    "compute_advantages", "cost_variants", "epoch_cost", "epoch_layout", "plan_epoch", "rollout_epoch",
    "score_rollout", "step_loss", "train", "train_update", "trained_positions",
]
