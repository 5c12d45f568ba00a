"""Sampler steps against diffusers' Euler step, an independent Normal, and hand-derived numbers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from rlkit.sampling import cps_step, euler_step, gaussian_log_prob, sde_std_t, sde_step, stochastic_step

SHAPE = (3, 4, 5, 5)


def _xv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def _grid(num_steps: int = 6, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    return sched


@pytest.mark.parametrize("method", ["sde", "cps", "euler"])
def test_zero_noise_equals_diffusers_euler_step(method):
    sched = _grid()
    ref_sched = _grid()
    x, _ = _xv()
    ref = x.clone()
    for i, t in enumerate(ref_sched.timesteps):
        g = torch.Generator().manual_seed(100 + i)
        v = torch.randn(SHAPE, generator=g)
        ref = ref_sched.step(v, t, ref, return_dict=False)[0]
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        if method == "sde":
            out = sde_step(x, v, sigma, sigma_next, 0.0, sched.sigmas[1], generator=torch.Generator().manual_seed(i))
        elif method == "cps":
            out = cps_step(x, v, sigma, sigma_next, 0.0, generator=torch.Generator().manual_seed(i))
        else:
            out = euler_step(x, v, sigma, sigma_next)
        assert torch.equal(out.std, torch.zeros_like(out.std))
        assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))
        if method == "cps":  # same maths, different rounding order
            torch.testing.assert_close(out.x_next, ref, rtol=0, atol=1e-5)
            x = ref.clone()
        else:
            assert torch.equal(out.x_next, ref), f"step {i} differs"
            x = out.x_next


def test_sde_step_matches_hand_formula_and_normal_log_prob():
    x, v = _xv(1)
    sigma, sigma_next, a, guard = 0.6, 0.45, 0.7, 0.97
    out = sde_step(x, v, sigma, sigma_next, a, guard, generator=torch.Generator().manual_seed(3))
    std_t = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.x_next, mean + std_t * math.sqrt(-dt) * eps)
    assert out.std.shape == (SHAPE[0], 1, 1, 1)
    torch.testing.assert_close(out.std.flatten(), torch.full((SHAPE[0],), std_t * math.sqrt(-dt)))
    ref = Normal(mean.double(), std_t * math.sqrt(-dt)).log_prob(out.x_next.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob.double(), ref, rtol=1e-5, atol=1e-5)


def test_sde_log_prob_of_given_transition_and_gradient_through_mean_only():
    x, v = _xv(2)
    v = v.clone().requires_grad_(True)
    target = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)).requires_grad_(True)
    out = sde_step(x, v, 0.5, 0.3, 0.7, 0.95, prev_sample=target)
    assert out.x_next is not None and torch.equal(out.x_next, target)
    ref = Normal(out.mean.detach(), out.std).log_prob(target.detach()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob.detach(), ref)
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert target.grad is None


def test_sde_per_sample_sigmas_equal_one_sample_at_a_time():
    x, v = _xv(4)
    sig = torch.tensor([1.0, 0.7, 0.3])
    nxt = torch.tensor([0.9, 0.5, 0.0])
    prev = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    batched = sde_step(x, v, sig, nxt, 0.7, 0.95, prev_sample=prev)
    for i in range(SHAPE[0]):
        single = sde_step(x[i:i + 1], v[i:i + 1], sig[i].item(), nxt[i].item(), 0.7, 0.95, prev_sample=prev[i:i + 1])
        torch.testing.assert_close(batched.log_prob[i:i + 1], single.log_prob)
        torch.testing.assert_close(batched.mean[i:i + 1], single.mean)


def test_sigma_one_guard_gives_finite_values():
    sched = _grid(10)
    assert sched.sigmas[0].item() == 1.0  # the shifted grid starts exactly at 1
    x, v = _xv(6)
    out = sde_step(x, v, sched.sigmas[0], sched.sigmas[1], 0.7, sched.sigmas[1])
    for t in out:
        assert torch.isfinite(t).all()
    expected = 0.7 * math.sqrt(1.0 / (1 - sched.sigmas[1].item()))
    torch.testing.assert_close(sde_std_t(torch.tensor(1.0), 0.7, sched.sigmas[1]), torch.tensor(expected))
    # without the guard the coefficient is infinite
    assert torch.isinf(sde_std_t(torch.tensor(1.0), 0.7, 1.0))


def test_cps_mean_and_std_hand_checked():
    # sigma 0.5 -> 0.25, a = 0.5: std = 0.25 sin(pi/4); sqrt(0.25^2 - std^2) = 0.25 cos(pi/4)
    x = torch.ones(1, 1, 1, 1)
    v = torch.full((1, 1, 1, 1), 2.0)
    out = cps_step(x, v, 0.5, 0.25, 0.5, prev_sample=torch.full((1, 1, 1, 1), 0.5))
    # x0_hat = 1 - 0.5*2 = 0, x1_hat = 1 + 0.5*2 = 2
    std = 0.25 * math.sin(math.pi / 4)
    mean = 0.75 * 0.0 + math.sqrt(0.25**2 - std**2) * 2.0
    assert out.std.item() == pytest.approx(std, abs=1e-7)
    assert out.mean.item() == pytest.approx(mean, abs=1e-6)
    assert out.log_prob.item() == pytest.approx(-((0.5 - mean) ** 2), abs=1e-6)
    proper = cps_step(x, v, 0.5, 0.25, 0.5, prev_sample=torch.full((1, 1, 1, 1), 0.5), log_prob_kind="gaussian")
    assert proper.log_prob.item() == pytest.approx(Normal(mean, std).log_prob(torch.tensor(0.5)).item(), abs=1e-5)


def test_cps_sample_uses_generator_noise_and_preserves_coefficients():
    x, v = _xv(7)
    out = cps_step(x, v, 0.8, 0.6, 0.8, generator=torch.Generator().manual_seed(11))
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(out.x_next, out.mean + 0.6 * math.sin(0.4 * math.pi) * eps)
    # with the exact velocity of x = (1 - s) x0 + s e, the mean keeps x0's coefficient (1 - s') and the
    # noise direction e at s' cos(a pi / 2), so that e and fresh noise together have variance s'^2
    x0, e = _xv(12)
    exact = cps_step(0.2 * x0 + 0.8 * e, e - x0, 0.8, 0.6, 0.8, prev_sample=x0)
    torch.testing.assert_close(exact.mean, 0.4 * x0 + 0.6 * math.cos(0.4 * math.pi) * e)


def test_cps_last_step_is_deterministic_and_finite():
    x, v = _xv(8)
    out = cps_step(x, v, 0.2, 0.0, 0.8, log_prob_kind="gaussian")
    torch.testing.assert_close(out.x_next, x - 0.2 * v)
    assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))


def test_determinism_and_per_sample_generators():
    x, v = _xv(9)
    a = sde_step(x, v, 0.5, 0.4, 0.7, 0.95, generator=torch.Generator().manual_seed(1))
    b = sde_step(x, v, 0.5, 0.4, 0.7, 0.95, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.x_next, b.x_next)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    c = sde_step(x, v, 0.5, 0.4, 0.7, 0.95, generator=gens)
    d = sde_step(x[1:2], v[1:2], 0.5, 0.4, 0.7, 0.95, generator=[torch.Generator().manual_seed(2)])
    assert torch.equal(c.x_next[1:2], d.x_next)


def test_bf16_inputs_computed_in_fp32():
    x, v = _xv(10)
    out = sde_step(x.bfloat16(), v.bfloat16(), 0.5, 0.4, 0.7, 0.95, generator=torch.Generator().manual_seed(0))
    ref = sde_step(x.bfloat16().float(), v.bfloat16().float(), 0.5, 0.4, 0.7, 0.95,
                   generator=torch.Generator().manual_seed(0))
    assert out.x_next.dtype == torch.float32
    assert torch.equal(out.x_next, ref.x_next)


def test_gaussian_log_prob_zero_std_has_finite_gradient():
    mean = torch.zeros(2, 3, requires_grad=True)
    std = torch.tensor([[0.0], [1.0]])
    lp = gaussian_log_prob(torch.ones(2, 3), mean, std)
    assert lp[0].item() == 0.0
    assert lp[1].item() == pytest.approx(-0.5 - 0.5 * math.log(2 * math.pi))
    lp.sum().backward()
    assert torch.isfinite(mean.grad).all()


def test_invalid_arguments_are_named():
    x, v = _xv()
    with pytest.raises(ValueError, match="noise_level"):
        sde_step(x, v, 0.5, 0.4, -0.1, 0.95)
    with pytest.raises(ValueError, match="noise_level"):
        cps_step(x, v, 0.5, 0.4, 1.5)
    with pytest.raises(ValueError, match="log_prob_kind"):
        cps_step(x, v, 0.5, 0.4, 0.5, log_prob_kind="mse")
    with pytest.raises(ValueError, match="method"):
        stochastic_step("ddim", x, v, 0.5, 0.4, 0.5, 0.95)
    with pytest.raises(ValueError, match="shape"):
        sde_step(x, v, torch.tensor([0.5, 0.4]), 0.3, 0.5, 0.95)
