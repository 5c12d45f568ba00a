"""Rollouts of the SD3 generator: ODE sampling with an optional window of SDE steps, and their log-probs.

One loop serves every caller:

- Flow-GRPO / -Fast: SDE (``sde`` or ``cps``) inside a window ``[start, start + size)`` of the sigma grid, Euler
  elsewhere; only the window transitions are stored (:class:`Rollout`). Window = all steps is plain
  Flow-GRPO. :func:`step_log_probs` recomputes a stored transition's log-prob under the current policy (with
  gradient) or under a reference (an adapter context or another transformer).
- ReFL: a no-grad ODE rollout that stops at step ``k`` (``stop_at``) and returns the state there.
- Evaluation: :func:`sample`, a plain ODE run to the final latents.

Classifier-free guidance runs the uncond (empty prompt) and cond halves as one doubled batch:
``v = v_uncond + w (v_cond - v_uncond)``; ``guidance_scale == 1`` runs the cond batch alone.
Randomness comes only from the explicit ``torch.Generator`` (one, or one per image so that an image does
not depend on how the batch is split); the same generators give the same rollout.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import Callable, ContextManager, NamedTuple, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from rewards.base import TextConditioning
from rlkit.sampling import CPS_LOG_PROBS, SDE_METHODS, CPSLogProb, Generators, SDEMethod, StepOutput, euler_step, \
    stochastic_step

NO_GUIDANCE = 1.0  # guidance scale at which CFG is skipped (the cond branch alone)
NEGATIVE_PROMPT = ""  # the uncond branch of CFG

Context = Callable[[], ContextManager]  # e.g. ``lambda: use_adapter(gen.transformer, None)``


class SDEWindow(NamedTuple):
    """The grid steps ``[start, start + size)`` that run the SDE; the others run Euler."""

    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and self.start <= step < self.end


def full_window(num_steps: int) -> SDEWindow:
    """Every step stochastic: plain Flow-GRPO."""
    return SDEWindow(0, num_steps)


def draw_window(start_range: tuple[int, int], size: int, num_steps: int, generator: torch.Generator) -> SDEWindow:
    """Flow-GRPO-Fast's window: start drawn uniformly from ``start_range`` (inclusive both ends)."""
    lo, hi = start_range
    if not 0 <= lo <= hi or hi + size > num_steps or size < 1:
        raise ValueError(f"window start range {[lo, hi]} with size {size} must fit in {num_steps} steps")
    start = int(torch.randint(lo, hi + 1, (1,), generator=generator).item())
    return SDEWindow(start, size)


def per_image_generators(seed: int, indices: Sequence[int],
                         device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded ``seed + index`` (a global image index, so that a sample does not
    depend on how images are split over processes or micro-batches)."""
    return [torch.Generator(device=device).manual_seed(seed + int(i)) for i in indices]


@dataclass
class Rollout:
    """A batch of B images sampled from a sigma grid, with the W transitions of its SDE window.

    Images of one prompt are adjacent (``group_size`` of them). Tensors are fp32 on the generator's device.
    """

    prompts: list[str]  # B prompts, each repeated group_size times, adjacent
    group_ids: Tensor  # (B,) long: prompt index (+ group_offset) of each image, for group advantages
    text: TextConditioning  # (B, L, D) / (B, P) prompt embeddings
    negative_text: TextConditioning | None  # (B, L, D) / (B, P) empty-prompt embeddings; None without CFG
    guidance_scale: float
    method: SDEMethod
    noise_level: float
    cps_log_prob: CPSLogProb
    sigma_max_guard: float  # the grid's sigmas[1], flow-SDE's guard at sigma == 1
    num_steps: int  # the grid has num_steps + 1 sigmas
    noise: Tensor  # (B, C, h, w) initial latents at sigma 1
    latents: Tensor  # (B, W, C, h, w) states before each window step
    next_latents: Tensor  # (B, W, C, h, w) states after each window step (the SDE samples)
    log_probs: Tensor  # (B, W) log-probs of the window transitions when sampled (logp_old)
    sigmas: Tensor  # (B, W) sigma at each window step
    next_sigmas: Tensor  # (B, W) sigma after each window step
    step_indices: Tensor  # (B, W) long: grid index of each window step
    state: Tensor  # (B, C, h, w) where the loop stopped: the final latents unless stop_at ended it early
    state_sigma: Tensor  # (B,) sigma of ``state`` (0 for final latents)
    stopped_at: int  # grid index of ``state`` (num_steps = ran to the end)

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def window_len(self) -> int:
        return self.latents.shape[1]

    @property
    def finished(self) -> bool:
        return self.stopped_at == self.num_steps

    @property
    def final_latents(self) -> Tensor:
        """(B, C, h, w) the clean sample; only for a rollout that ran to the end."""
        if not self.finished:
            raise ValueError(f"this rollout stopped at step {self.stopped_at} of {self.num_steps}; use `state`")
        return self.state

    @property
    def window_end_latents(self) -> Tensor:
        """(B, C, h, w) the state right after the last window step."""
        self._need_window()
        return self.next_latents[:, -1]

    @property
    def window_end_sigma(self) -> Tensor:
        """(B,) sigma of :attr:`window_end_latents`."""
        self._need_window()
        return self.next_sigmas[:, -1]

    def _need_window(self) -> None:
        if self.window_len == 0:
            raise ValueError("this rollout has no SDE window")

    def index(self, idx: Tensor | Sequence[int] | slice) -> "Rollout":
        """The rollout of a subset of its images (micro-batches of the GRPO update)."""
        if isinstance(idx, slice):
            rows = list(range(self.batch_size))[idx]
        else:
            rows = [int(i) for i in (idx.tolist() if isinstance(idx, Tensor) else idx)]
        sel = torch.tensor(rows, dtype=torch.long, device=self.noise.device)
        changes: dict[str, object] = {"prompts": [self.prompts[i] for i in rows], "text": self.text.index(sel),
                                      "negative_text": None if self.negative_text is None
                                      else self.negative_text.index(sel)}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in changes and isinstance(value, Tensor):
                changes[f.name] = value[sel]
        return replace(self, **changes)

    @staticmethod
    def cat(items: Sequence["Rollout"]) -> "Rollout":
        """Concatenate rollouts sampled with the same settings and window length."""
        if not items:
            raise ValueError("Rollout.cat needs at least one rollout")
        first = items[0]
        for name in ("guidance_scale", "method", "noise_level", "cps_log_prob", "num_steps", "stopped_at",
                     "window_len"):
            values = {getattr(r, name) for r in items}
            if len(values) > 1:
                raise ValueError(f"cannot concatenate rollouts with different {name}: {sorted(map(str, values))}")
        changes: dict[str, object] = {
            "prompts": [p for r in items for p in r.prompts],
            "text": TextConditioning.cat([r.text for r in items]),
            "negative_text": None if first.negative_text is None
            else TextConditioning.cat([r.negative_text for r in items]),
        }
        for f in fields(first):
            if f.name not in changes and isinstance(getattr(first, f.name), Tensor):
                changes[f.name] = torch.cat([getattr(r, f.name) for r in items])
        return replace(first, **changes)


def guided_velocity(
    gen,
    x: Tensor,
    sigma: Tensor,
    text: TextConditioning,
    negative_text: TextConditioning | None = None,
    guidance_scale: float = NO_GUIDANCE,
    transformer=None,
    uncond_grad: bool = True,
) -> Tensor:
    """The velocity at ``x`` (B, C, h, w), sigma (B,), with CFG on a doubled batch when ``guidance_scale != 1``.

    ``gen`` is an ``SD3Generator``. Gradients flow through both CFG branches, or through the conditional one
    alone with ``uncond_grad=False`` (the unconditional velocity is detached, as upstream Flow-GRPO trains).
    """
    if guidance_scale == NO_GUIDANCE:
        return gen.velocity(x, sigma, text, transformer=transformer)
    if negative_text is None:
        raise ValueError(f"guidance_scale {guidance_scale} needs negative_text (the uncond embeddings)")
    both = gen.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), TextConditioning.cat([negative_text, text]),
                        transformer=transformer)
    v_uncond, v_cond = both.chunk(2)
    if not uncond_grad:
        v_uncond = v_uncond.detach()
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def _initial_noise(gen, batch: int, resolution: int | None, generator: Generators) -> Tensor:
    if resolution is None:
        resolution = gen.transformer.config.sample_size * gen.vae_scale_factor
    shape = (batch, *gen.latent_shape(resolution))
    return randn_tensor(shape, generator=generator, device=gen.device, dtype=torch.float32)


@torch.no_grad()
def rollout(
    gen,
    prompts: list[str],
    *,
    num_steps: int,
    generator: Generators,
    group_size: int = 1,
    window: SDEWindow | None = None,
    method: SDEMethod = "sde",
    noise_level: float = 0.7,
    guidance_scale: float = NO_GUIDANCE,
    stop_at: int | None = None,
    latents: Tensor | None = None,
    resolution: int | None = None,
    transformer=None,
    cps_log_prob: CPSLogProb = "upstream",
    group_offset: int = 0,
) -> Rollout:
    """Sample ``group_size`` images for each of ``prompts`` (B = len(prompts) * group_size), without gradient.

    ``window``: the SDE steps (None = pure ODE; :func:`full_window` = plain Flow-GRPO; :func:`draw_window`
    for -Fast). ``stop_at``: return after ``stop_at`` steps with ``state`` at ``sigmas[stop_at]`` (ReFL's
    rollout to step k; GRPO's ``reward_at: window_end`` with ``stop_at = window.end``); window steps past it
    are not run. ``generator``: one generator, or a list of B (one per image), for the initial noise (unless
    ``latents`` (B, C, h, w) are given) and the SDE noise. ``group_offset`` shifts ``group_ids`` (global
    prompt labels across processes).
    """
    if method not in SDE_METHODS:
        raise ValueError(f"method must be one of {SDE_METHODS}, got {method!r}")
    if cps_log_prob not in CPS_LOG_PROBS:
        raise ValueError(f"cps_log_prob must be one of {CPS_LOG_PROBS}, got {cps_log_prob!r}")
    if num_steps < 1 or group_size < 1:
        raise ValueError(f"num_steps and group_size must be >= 1, got {num_steps} and {group_size}")
    end = num_steps if stop_at is None else stop_at
    if not 0 <= end <= num_steps:
        raise ValueError(f"stop_at must lie in [0, {num_steps}], got {stop_at}")
    if window is not None and (window.start < 0 or window.size < 0 or window.end > num_steps):
        raise ValueError(f"window {tuple(window)} must fit in {num_steps} steps")
    if generator is None and (latents is None or (window is not None and window.size > 0 and end > window.start)):
        raise ValueError("rollout needs an explicit torch.Generator (no hidden global RNG)")
    all_prompts = [p for p in prompts for _ in range(group_size)]
    batch = len(all_prompts)
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"a list of generators needs one per image ({batch}), got {len(generator)}")

    device = gen.device
    text = gen.encode_prompts(all_prompts)
    negative_text = gen.encode_prompts([NEGATIVE_PROMPT] * batch) if guidance_scale != NO_GUIDANCE else None
    grid = gen.sigmas(num_steps, device=device)  # (num_steps + 1,)
    guard = float(grid[1])
    x = _initial_noise(gen, batch, resolution, generator) if latents is None else latents.to(device).float()
    if x.shape[0] != batch:
        raise ValueError(f"latents have batch {x.shape[0]}, expected {batch}")
    noise = x.clone()

    before, after, log_probs, steps = [], [], [], []
    for i in range(end):
        sigma, sigma_next = grid[i].expand(batch), grid[i + 1].expand(batch)
        v = guided_velocity(gen, x, sigma, text, negative_text, guidance_scale, transformer)
        if window is not None and i in window:
            out = stochastic_step(method, x, v, sigma, sigma_next, noise_level, guard, generator,
                                  cps_log_prob=cps_log_prob)
            before.append(x)
            after.append(out.x_next)
            log_probs.append(out.log_prob)
            steps.append(i)
        else:
            out = euler_step(x, v, sigma, sigma_next)
        x = out.x_next

    step_idx = torch.tensor(steps, dtype=torch.long, device=device).expand(batch, -1)
    empty = x.new_zeros((batch, 0, *x.shape[1:]))
    return Rollout(
        prompts=all_prompts,
        group_ids=group_offset + torch.arange(len(prompts), device=device).repeat_interleave(group_size),
        text=text,
        negative_text=negative_text,
        guidance_scale=guidance_scale,
        method=method,
        noise_level=noise_level,
        cps_log_prob=cps_log_prob,
        sigma_max_guard=guard,
        num_steps=num_steps,
        noise=noise,
        latents=torch.stack(before, dim=1) if before else empty,
        next_latents=torch.stack(after, dim=1) if after else empty.clone(),
        log_probs=torch.stack(log_probs, dim=1) if log_probs else x.new_zeros((batch, 0)),
        sigmas=grid[step_idx],
        next_sigmas=grid[step_idx + 1],
        step_indices=step_idx.clone(),
        state=x,
        state_sigma=grid[end].expand(batch).clone(),
        stopped_at=end,
    )


def step_log_probs(
    gen,
    ro: Rollout,
    j: int,
    *,
    transformer=None,
    context: Context | None = None,
    uncond_grad: bool = True,
) -> StepOutput:
    """Re-evaluate the stored transition ``j`` of the window (``latents[:, j] -> next_latents[:, j]``).

    Runs with whatever grad mode the caller is in: with grad for the policy (the GRPO loss), under
    ``torch.no_grad()`` for the reference. ``context`` is entered around the forward pass, e.g.
    ``lambda: use_adapter(gen.transformer, None)`` for the LoRA-disabled reference; ``transformer`` replaces
    the generator's transformer; ``uncond_grad=False`` detaches CFG's unconditional branch
    (:func:`guided_velocity`). Returns the step's ``StepOutput``: ``log_prob`` (B,) and ``mean`` with gradient,
    ``std`` for the KL.
    """
    if not 0 <= j < ro.window_len:
        raise ValueError(f"window position {j} out of range [0, {ro.window_len})")
    x, sigma = ro.latents[:, j], ro.sigmas[:, j]
    with context() if context is not None else nullcontext():
        v = guided_velocity(gen, x, sigma, ro.text, ro.negative_text, ro.guidance_scale, transformer, uncond_grad)
    return stochastic_step(ro.method, x, v, sigma, ro.next_sigmas[:, j], ro.noise_level, ro.sigma_max_guard,
                           prev_sample=ro.next_latents[:, j], cps_log_prob=ro.cps_log_prob)


def window_log_probs(gen, ro: Rollout, *, transformer=None, context: Context | None = None) -> Tensor:
    """(B, W) log-probs of every stored transition (one forward per window step)."""
    lps = [step_log_probs(gen, ro, j, transformer=transformer, context=context).log_prob for j in range(ro.window_len)]
    return torch.stack(lps, dim=1) if lps else ro.log_probs.new_zeros((ro.batch_size, 0))


@torch.no_grad()
def sample(
    gen,
    prompts: list[str],
    num_steps: int,
    guidance_scale: float = NO_GUIDANCE,
    generator: Generators = None,
    *,
    latents: Tensor | None = None,
    resolution: int | None = None,
    transformer=None,
) -> Tensor:
    """Evaluation sampling: Euler ODE from noise to the clean latents (B, C, h, w), one image per prompt."""
    ro = rollout(gen, prompts, num_steps=num_steps, generator=generator, guidance_scale=guidance_scale,
                 latents=latents, resolution=resolution, transformer=transformer)
    return ro.final_latents


__all__ = [
    "Context", "NEGATIVE_PROMPT", "NO_GUIDANCE", "Rollout", "SDEWindow", "draw_window", "full_window",
    "guided_velocity", "per_image_generators", "rollout", "sample", "step_log_probs", "window_log_probs",
]
