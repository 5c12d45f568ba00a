"""One step of the flow sampler: Euler (ODE), flow-SDE and CPS, with Gaussian log-probs.

Pure functions of tensors, computed in fp32 whatever the model's dtype (bf16 overflows in the SDE mean).
Conventions (``DESIGN.md``): sigma runs from 1 (noise) to 0; ``dt = sigma_next - sigma < 0``; ``v`` is the
predicted velocity ``eps - x0``; ``x0_hat = x - sigma v``; ``x1_hat = x + (1 - sigma) v``.

``sigma`` and ``sigma_next`` are Python floats, 0-d tensors, or per-sample ``(B,)`` tensors (several windows
in one batch). Every step returns a :class:`StepOutput` whose ``std`` is the standard deviation of the
*transition*: ``x_next = mean + std * eps``. A step with ``std == 0`` (noise level 0, or the last CPS step)
is deterministic: its log-prob is reported as 0 (a point mass has no density; trainers do not train on it).

Log-probs are AVERAGED over the latent elements, not summed (upstream Flow-GRPO): ratios stay near 1 so
the tiny clip ranges of the released recipes work. The sample whose log-prob is taken is always detached;
gradients flow through the mean only.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

SDEMethod = Literal["sde", "cps"]
CPSLogProb = Literal["upstream", "gaussian"]
SDE_METHODS: tuple[str, ...] = ("sde", "cps")
CPS_LOG_PROBS: tuple[str, ...] = ("upstream", "gaussian")
HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)

Generators = torch.Generator | list[torch.Generator] | None


class StepOutput(NamedTuple):
    x_next: Tensor  # (B, C, h, w) fp32: the sample (or the given ``prev_sample``)
    log_prob: Tensor  # (B,) fp32: Gaussian log-density of x_next, averaged over elements
    mean: Tensor  # (B, C, h, w) fp32: the transition mean (carries the gradient)
    std: Tensor  # (B, 1, 1, 1) fp32: the transition standard deviation (0 = deterministic step)


def _column(value: float | Tensor, like: Tensor) -> Tensor:
    """A scalar or ``(B,)`` noise level as an fp32 tensor broadcastable against ``like`` (B, ...)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"noise levels must be a scalar or of shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.ndim - 1)))


def _elementwise_mean(t: Tensor) -> Tensor:
    return t.mean(dim=tuple(range(1, t.ndim)))


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Log-density of ``sample`` under N(mean, std^2), averaged over all but the batch dim -> (B,).

    Elements whose ``std`` is 0 contribute 0 (deterministic transition); gradients stay finite there.
    """
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    elem = -((sample.detach() - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - HALF_LOG_TWO_PI
    return _elementwise_mean(torch.where(positive, elem, torch.zeros_like(elem)))


def _noise(shape: torch.Size, generator: Generators, device: torch.device) -> Tensor:
    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)


def euler_step(x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> StepOutput:
    """The ODE step ``x + v dt`` (bitwise what ``FlowMatchEulerDiscreteScheduler.step`` computes)."""
    x, v = x.float(), v.float()
    dt = _column(sigma_next, x) - _column(sigma, x)
    mean = x + v * dt
    zeros = torch.zeros(x.shape[0], device=x.device)
    return StepOutput(mean, zeros, mean, torch.zeros_like(dt))


def sde_std_t(sigma: Tensor, noise_level: float, sigma_max_guard: float | Tensor) -> Tensor:
    """Flow-SDE diffusion coefficient ``a * sqrt(sigma / (1 - sigma'))``, ``sigma' = guard`` where sigma == 1.

    ``sigma_max_guard`` is the largest grid sigma below 1 (upstream's ``sigmas[1]``).
    """
    # a Python number stays one: turning it into a tensor on the accelerator would be a blocking copy every step
    guard = sigma_max_guard.to(sigma.device, torch.float32) if isinstance(sigma_max_guard, Tensor) \
        else float(sigma_max_guard)
    denom = 1 - torch.where(sigma == 1, guard, sigma)
    return noise_level * torch.sqrt(sigma / denom)


def sde_step(
    x: Tensor,
    v: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float,
    sigma_max_guard: float | Tensor,
    generator: Generators = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """Flow-GRPO's marginal-preserving SDE step with the log-prob of its sample.

    ``mean = x + [v + std_t^2 / (2 sigma) (x + (1 - sigma) v)] dt``; ``x_next = mean + std_t sqrt(-dt) eps``.
    With ``prev_sample`` given, no noise is drawn and the log-prob is that of the stored transition.
    ``noise_level = 0`` gives exactly :func:`euler_step`.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    x, v = x.float(), v.float()
    s = _column(sigma, x)
    dt = _column(sigma_next, x) - s
    std_t = sde_std_t(s, noise_level, sigma_max_guard)
    mean = x + (v + std_t**2 / (2 * s) * (x + (1 - s) * v)) * dt
    std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        prev_sample = mean + std * _noise(x.shape, generator, x.device)
    prev_sample = prev_sample.float()
    return StepOutput(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std)


def cps_step(
    x: Tensor,
    v: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float,
    generator: Generators = None,
    prev_sample: Tensor | None = None,
    log_prob_kind: CPSLogProb = "upstream",
) -> StepOutput:
    """Coefficients-preserving sampling step (CPS).

    ``std = sigma_next sin(a pi / 2)``; ``mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat``
    (the square root is computed as ``sigma_next cos(a pi / 2)``, equal and never NaN); ``x_next = mean + std eps``.

    ``log_prob_kind``: ``"upstream"`` is flow_grpo's ``-mean((x_next - mean)^2)`` (constants and variance
    dropped; what the released clip ranges were tuned for); ``"gaussian"`` is the proper averaged Gaussian
    log-density. ``noise_level`` must lie in [0, 1]; 0 is the Euler step up to rounding.
    """
    if not 0 <= noise_level <= 1:
        raise ValueError(f"noise_level must lie in [0, 1] for CPS, got {noise_level}")
    if log_prob_kind not in CPS_LOG_PROBS:
        raise ValueError(f"log_prob_kind must be one of {CPS_LOG_PROBS}, got {log_prob_kind!r}")
    x, v = x.float(), v.float()
    s = _column(sigma, x)
    s_next = _column(sigma_next, x)
    angle = noise_level * math.pi / 2
    std = s_next * math.sin(angle)
    x0_hat = x - s * v
    x1_hat = x + (1 - s) * v
    mean = (1 - s_next) * x0_hat + s_next * math.cos(angle) * x1_hat
    if prev_sample is None:
        prev_sample = mean + std * _noise(x.shape, generator, x.device)
    prev_sample = prev_sample.float()
    if log_prob_kind == "upstream":
        log_prob = _elementwise_mean(-((prev_sample.detach() - mean) ** 2))
    else:
        log_prob = gaussian_log_prob(prev_sample, mean, std)
    return StepOutput(prev_sample, log_prob, mean, std)


def stochastic_step(
    method: SDEMethod,
    x: Tensor,
    v: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    noise_level: float,
    sigma_max_guard: float | Tensor,
    generator: Generators = None,
    prev_sample: Tensor | None = None,
    cps_log_prob: CPSLogProb = "upstream",
) -> StepOutput:
    """:func:`sde_step` or :func:`cps_step` by name (``sigma_max_guard`` is unused by CPS)."""
    if method == "sde":
        return sde_step(x, v, sigma, sigma_next, noise_level, sigma_max_guard, generator, prev_sample)
    if method == "cps":
        return cps_step(x, v, sigma, sigma_next, noise_level, generator, prev_sample, cps_log_prob)
    raise ValueError(f"method must be one of {SDE_METHODS}, got {method!r}")


__all__ = [
    "CPSLogProb", "CPS_LOG_PROBS", "SDEMethod", "SDE_METHODS", "StepOutput", "cps_step", "euler_step",
    "gaussian_log_prob", "sde_std_t", "sde_step", "stochastic_step",
]
