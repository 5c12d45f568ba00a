"""ReFL: reward feedback learning with latent rewards on intermediate states (``algorithm: refl``).

One update (ImageReward's ReFL, in the flow-matching form of the DiNa-LRM release):

1. noise for the global batch from the step's seed (ranks take their slice, so the run does not depend
   on the process count); a no-grad rollout with CFG along the scheduler grid to a step ``k`` drawn from
   ``grad_step_range``;
2. ``grad_steps`` gradient-carrying transformer steps from ``k``; the last gives ``x0_hat = x - sigma v``
   and the next state ``x' = x + (sigma' - sigma) v``;
3. the reward reads the latent directly, no VAE decode for a latent reward: ``x0_hat`` at sigma 0 (DiNa-LRM
   in ``renoise`` mode re-noises it at ``u``), or the state ``x'`` at its own sigma (``reward_at: state``,
   DiNa-LRM in ``state`` mode);
4. loss from the reward (``margin - r``, ``-r`` or ``relu(margin - r) * scale``), plus an optional trust region
   ``kl_beta |v - v_base|^2`` at the gradient-carrying steps, optionally combined with a flow-matching
   pre-training loss as ``(L_reward + lambda L_pre) / (1 + lambda)``; backward into the policy.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable

import torch
from torch import Tensor

from rewards.base import MemoDecode, Reward, RewardInput, TextConditioning
from rlkit.config import ReFLConfig, Recipe
from rlkit.models.sd3 import SD3Generator
from rlkit.trainers.common import reference_context, require_differentiable, require_noise_aware


def reward_loss(scores: Tensor, kind: str, margin: float, scale: float) -> Tensor:
    """Per-sample ReFL loss from (normalised) reward scores."""
    if kind == "margin":
        return (margin - scores) * scale
    if kind == "neg":
        return -scores * scale
    if kind == "relu_margin":
        return torch.relu(margin - scores) * scale
    raise ValueError(f"unknown ReFL loss {kind!r}")


def combine_losses(l_reward: Tensor, l_pre: Tensor | None, weight: float) -> Tensor:
    """``(L_reward + lambda L_pre) / (1 + lambda)``; the reward loss alone when the regulariser is off."""
    if l_pre is None or weight == 0:
        return l_reward
    return (l_reward + weight * l_pre) / (1 + weight)


def flow_matching_loss(gen: SD3Generator, transformer, x0: Tensor, text: TextConditioning,
                       rng: torch.Generator) -> Tensor:
    """Rectified-flow loss ``|v_theta(x_t, t) - (eps - x0)|^2`` at ``t ~ U(0, 1)`` (the pre-training loss)."""
    sigmas = torch.rand(x0.shape[0], generator=rng).to(x0.device)
    noise = torch.randn(x0.shape, generator=rng).to(x0.device)
    s = sigmas.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    v = gen.velocity(x_t, sigmas, text, transformer=transformer)
    return ((v - (noise - x0)) ** 2).mean()


def refl_forward(gen: SD3Generator, transformer, reward: Reward, prompts: list[str], noise: Tensor,
                 cfg: ReFLConfig, k: int, reward_rng: torch.Generator | None = None,
                 reference: Callable[[], contextlib.AbstractContextManager] | None = None) -> tuple[Tensor, dict]:
    """One ReFL forward for a batch: returns the per-sample loss and the scores (for logging).

    ``noise`` is the initial latent (B, C, h, w); ``k`` the first gradient-carrying step. ``reference`` (a context
    that turns the policy into the base model) adds ``kl_beta |v - v_base|^2`` at each gradient-carrying step,
    which is proportional per step to the KL between the two models' Gaussian transitions (their means differ by
    ``dt (v - v_base)``): a trust region that keeps the reward's gradient from pulling the policy far from the
    base, where a reward model learned from the base's own samples stops being right.
    """
    from rlkit.rollout import guided_velocity, rollout

    ro = rollout(gen, prompts, num_steps=cfg.num_steps, generator=None, latents=noise,
                 guidance_scale=cfg.guidance_scale, stop_at=k, transformer=transformer)
    sigmas = gen.sigmas(cfg.num_steps).to(noise.device)
    text, uncond, x = ro.text, ro.negative_text, ro.state
    last = min(k + cfg.grad_steps, cfg.num_steps) - 1
    drift = torch.zeros(noise.shape[0], device=noise.device)
    for j in range(k, last + 1):
        sigma, sigma_next = sigmas[j], sigmas[j + 1]
        sigma_b = sigma.expand(x.shape[0])
        v = guided_velocity(gen, x, sigma_b, text, uncond, cfg.guidance_scale, transformer)
        if reference is not None:
            with torch.no_grad(), reference():
                v_base = guided_velocity(gen, x, sigma_b, text, uncond, cfg.guidance_scale, transformer)
            drift = drift + ((v - v_base) ** 2).flatten(1).mean(1)
        x0_hat = x - sigma * v
        x = x + (sigma_next - sigma) * v
    batch_size = noise.shape[0]
    if cfg.reward_at == "x0_hat":
        latents, at = x0_hat, torch.zeros(batch_size, device=noise.device)
    else:
        latents, at = x, sigmas[last + 1].expand(batch_size)
    out = reward(RewardInput(prompts=prompts, latents=latents, sigmas=at, text=text,
                             decode=MemoDecode(gen.decode), generator=reward_rng))
    scores = out.scores.to(latents.device)  # the loss lives with the policy, wherever the reward computed
    loss = reward_loss(scores, cfg.loss, cfg.margin, cfg.loss_scale)
    stats = {"reward": scores.detach().mean().item(), "grad_step": float(k), "sigma": sigmas[k].item()}
    if reference is not None:
        loss = loss + cfg.kl_beta * drift
        stats["kl"] = drift.detach().mean().item()
    for name, value in out.extras.items():
        if value.ndim == 1:
            stats[f"reward/{name}"] = value.detach().float().mean().item()
    return loss, stats


def check_reward(reward: Reward, cfg: ReFLConfig) -> None:
    require_differentiable(reward, "rewards")
    if cfg.reward_at == "state":
        require_noise_aware(reward, "refl")


def train(recipe: Recipe) -> dict:
    """Runs ReFL as the recipe says; returns the final metrics."""
    from rlkit.trainers.loop import PolicyRun

    cfg = recipe.refl
    run = PolicyRun.setup(recipe, total_updates=cfg.max_steps, micro_batch=cfg.batch_size,
                          grad_accum=cfg.grad_accum, check_reward=functools.partial(check_reward, cfg=cfg))
    pool = run.pretrain_pool(cfg.pretrain) if cfg.pretrain.weight > 0 else None
    reference = reference_context(run) if cfg.kl_beta > 0 else None
    while not run.finished:
        step = run.step
        t0 = time.perf_counter()
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            rng = run.step_generator(step, micro)
            prompts = run.sample_prompts(rng, cfg.batch_size)
            noise = run.global_noise(rng, cfg.batch_size)
            lo, hi = cfg.grad_step_range
            k = int(torch.randint(lo, hi + 1, (1,), generator=rng))
            with run.accumulate():
                l_refl, stats = refl_forward(run.gen, run.model, run.reward, prompts, noise, cfg, k,
                                             reward_rng=run.rank_generator(step, micro, "reward"),
                                             reference=reference)
                l_pre = None
                if pool is not None:
                    x0, pool_prompts = pool.draw(run.rank_generator(step, micro, "pretrain"), cfg.batch_size)
                    l_pre = flow_matching_loss(run.gen, run.model, x0, run.gen.encode_prompts(pool_prompts),
                                               run.rank_generator(step, micro, "fm"))
                    stats["loss_pretrain"] = l_pre.item()
                loss = combine_losses(l_refl.mean(), l_pre, cfg.pretrain.weight)
                stats["loss"] = loss.item()
                run.backward(loss)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
        totals["time/update_s"] = time.perf_counter() - t0
        run.end_update(totals)
    return run.finish()
