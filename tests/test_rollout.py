"""Rollouts on the tiny SD3 generator: shapes, determinism, window storage, early stops, recomputed log-probs."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch

from rlkit.rollout import (
    Rollout,
    SDEWindow,
    draw_window,
    full_window,
    per_image_generators,
    rollout,
    sample,
    step_log_probs,
    window_log_probs,
)

PROMPTS = ["a red circle", "a blue square"]
STEPS = 4


@pytest.fixture(scope="module")
def shared_generator(tiny_sd3_dir):
    """One tiny generator for the tests that only sample (tests that train take a fresh ``tiny_generator``)."""
    from rlkit.models.sd3 import SD3Generator

    return SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=16)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_window_storage(shared_generator):
    ro = rollout(shared_generator, PROMPTS, num_steps=STEPS, generator=_gen(), group_size=2,
                 window=SDEWindow(1, 2), method="sde", noise_level=0.7, guidance_scale=2.0)
    c, h, w = shared_generator.latent_shape(shared_generator.transformer.config.sample_size * 2)
    grid = shared_generator.sigmas(STEPS)
    assert ro.prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert ro.group_ids.tolist() == [0, 0, 1, 1]
    assert ro.latents.shape == ro.next_latents.shape == (4, 2, c, h, w)
    assert ro.log_probs.shape == (4, 2) and torch.isfinite(ro.log_probs).all()
    assert ro.step_indices.tolist() == [[1, 2]] * 4
    torch.testing.assert_close(ro.sigmas, grid[[1, 2]].expand(4, 2))
    torch.testing.assert_close(ro.next_sigmas, grid[[2, 3]].expand(4, 2))
    assert torch.equal(ro.next_latents[:, 0], ro.latents[:, 1])  # consecutive window steps chain
    assert ro.finished and ro.stopped_at == STEPS and torch.equal(ro.state_sigma, torch.zeros(4))
    assert ro.final_latents.shape == (4, c, h, w) and ro.noise.shape == (4, c, h, w)
    assert ro.negative_text is not None and len(ro.negative_text) == 4 and len(ro.text) == 4
    assert ro.sigma_max_guard == pytest.approx(grid[1].item())
    # two images of one prompt differ (their noises differ)
    assert not torch.allclose(ro.final_latents[0], ro.final_latents[1])


def test_deterministic_under_fixed_generators(shared_generator):
    kwargs = dict(num_steps=STEPS, group_size=2, window=full_window(STEPS), method="cps", noise_level=0.8)
    a = rollout(shared_generator, PROMPTS, generator=_gen(5), **kwargs)
    b = rollout(shared_generator, PROMPTS, generator=_gen(5), **kwargs)
    c = rollout(shared_generator, PROMPTS, generator=_gen(6), **kwargs)
    for name in ("noise", "latents", "next_latents", "log_probs", "state"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.allclose(a.state, c.state)


def test_sde_noise_changes_the_sample_only_inside_the_window(shared_generator):
    ode = rollout(shared_generator, PROMPTS, num_steps=STEPS, generator=_gen(1))
    sde = rollout(shared_generator, PROMPTS, num_steps=STEPS, generator=_gen(1), window=SDEWindow(2, 1))
    assert ode.window_len == 0 and ode.latents.shape[1] == 0
    assert torch.equal(ode.noise, sde.noise)
    # before the window both ran the same Euler steps
    stopped = rollout(shared_generator, PROMPTS, num_steps=STEPS, generator=_gen(1), stop_at=2)
    assert torch.equal(sde.latents[:, 0], stopped.state)
    assert not torch.allclose(ode.state, sde.state)


def test_stop_at_and_window_end_states_equal_the_full_run(shared_generator):
    kwargs = dict(num_steps=STEPS, window=SDEWindow(1, 2), method="sde", noise_level=0.7, guidance_scale=3.0)
    full = rollout(shared_generator, PROMPTS, generator=_gen(2), **kwargs)
    # ReFL-style stop inside the window: the state the full run passes through at step 2
    mid = rollout(shared_generator, PROMPTS, generator=_gen(2), stop_at=2, **kwargs)
    assert mid.stopped_at == 2 and not mid.finished
    assert torch.equal(mid.state, full.latents[:, 1])
    torch.testing.assert_close(mid.state_sigma, full.sigmas[:, 1])
    assert mid.window_len == 1 and torch.equal(mid.log_probs, full.log_probs[:, :1])
    # GRPO's reward_at window_end: stop at window.end, skip the remaining ODE steps
    end = rollout(shared_generator, PROMPTS, generator=_gen(2), stop_at=kwargs["window"].end, **kwargs)
    assert torch.equal(end.state, full.window_end_latents)
    assert torch.equal(end.state_sigma, full.window_end_sigma)
    assert torch.equal(end.next_latents, full.next_latents)
    with pytest.raises(ValueError, match="stopped at step 3"):
        _ = end.final_latents


@pytest.mark.parametrize("method,guidance", [("sde", 1.0), ("cps", 2.5)])
def test_recomputed_log_probs_equal_stored_and_carry_gradient(tiny_generator, method, guidance):
    ro = rollout(tiny_generator, PROMPTS, num_steps=STEPS, generator=_gen(3), group_size=2,
                 window=SDEWindow(0, 2), method=method, noise_level=0.7, guidance_scale=guidance)
    recomputed = window_log_probs(tiny_generator, ro)
    torch.testing.assert_close(recomputed, ro.log_probs, rtol=0, atol=1e-6)  # on-policy ratio == 1
    ratio = torch.exp(recomputed - ro.log_probs)
    assert (ratio - 1).abs().max().item() < 1e-5
    recomputed.sum().backward()
    grads = [p.grad for p in tiny_generator.transformer.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_reference_by_context_and_by_transformer(shared_generator):
    ro = rollout(shared_generator, PROMPTS, num_steps=STEPS, generator=_gen(4), window=SDEWindow(1, 1))
    weight = shared_generator.transformer.proj_out.weight
    original = weight.detach().clone()
    entered = []

    @contextmanager
    def perturbed():  # stands in for use_adapter(transformer, None)
        entered.append(True)
        with torch.no_grad():
            weight.add_(0.05)
        try:
            yield
        finally:
            with torch.no_grad():
                weight.copy_(original)

    with torch.no_grad():
        policy = step_log_probs(shared_generator, ro, 0)
        ref = step_log_probs(shared_generator, ro, 0, context=perturbed)
        other = copy.deepcopy(shared_generator.transformer)
        other.proj_out.weight.add_(0.05)
        ref_t = step_log_probs(shared_generator, ro, 0, transformer=other)
    assert entered and torch.equal(weight, original)
    torch.testing.assert_close(policy.log_prob, ro.log_probs[:, 0], rtol=0, atol=1e-6)
    assert not torch.allclose(ref.mean, policy.mean)
    torch.testing.assert_close(ref.mean, ref_t.mean)
    assert torch.equal(ref.std, policy.std)


def test_per_image_generators_do_not_depend_on_the_batch(shared_generator):
    kwargs = dict(num_steps=STEPS, window=SDEWindow(0, 2), method="sde", noise_level=0.7)
    both = rollout(shared_generator, PROMPTS, generator=per_image_generators(10, [0, 1]), **kwargs)
    second = rollout(shared_generator, PROMPTS[1:], generator=per_image_generators(10, [1]), **kwargs)
    assert torch.equal(both.noise[1:], second.noise)
    # the transformer's batched matmuls round differently with batch size (~1e-7)
    torch.testing.assert_close(both.state[1:], second.state, rtol=0, atol=1e-4)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sample_equals_diffusers_euler_loop(shared_generator, guidance):
    gen = shared_generator
    latents = sample(gen, PROMPTS, num_steps=3, guidance_scale=guidance, generator=_gen(7))
    # independent reference: diffusers' scheduler stepping on the pipeline's CFG convention
    x = torch.randn((2, *gen.latent_shape(16)), generator=_gen(7))
    sched = copy.deepcopy(gen.scheduler)
    sched.set_timesteps(3)
    embeds, neg, pooled, neg_pooled = gen.pipeline.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True, negative_prompt="",
        max_sequence_length=gen.max_sequence_length)
    with torch.no_grad():
        for t in sched.timesteps:
            if guidance == 1.0:
                v = gen.transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                                    timestep=t.expand(2), return_dict=False)[0]
            else:
                both = gen.transformer(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.cat([neg, embeds]),
                                       pooled_projections=torch.cat([neg_pooled, pooled]), timestep=t.expand(4),
                                       return_dict=False)[0]
                vu, vc = both.chunk(2)
                v = vu + guidance * (vc - vu)
            x = sched.step(v, t, x, return_dict=False)[0]
    torch.testing.assert_close(latents, x, rtol=0, atol=1e-5)


def test_draw_window_range_and_determinism():
    starts = {draw_window((0, 2), 3, 10, _gen(s)).start for s in range(40)}
    assert starts == {0, 1, 2}
    assert draw_window((1, 4), 2, 6, _gen(9)) == draw_window((1, 4), 2, 6, _gen(9))
    assert full_window(5) == SDEWindow(0, 5) and 4 in full_window(5) and 5 not in full_window(5)
    with pytest.raises(ValueError, match="must fit"):
        draw_window((0, 8), 3, 10, _gen())


def test_index_and_cat_round_trip(shared_generator):
    kwargs = dict(num_steps=STEPS, window=SDEWindow(1, 2), group_size=2)
    ro = rollout(shared_generator, PROMPTS, generator=_gen(8), guidance_scale=2.0, **kwargs)
    parts = [ro.index([0, 1]), ro.index(slice(2, 4))]
    assert parts[1].prompts == ["a blue square"] * 2 and parts[1].group_ids.tolist() == [1, 1]
    back = Rollout.cat(parts)
    for name in ("latents", "next_latents", "log_probs", "sigmas", "state", "group_ids"):
        assert torch.equal(getattr(back, name), getattr(ro, name)), name
    assert torch.equal(back.negative_text.encoder_hidden_states, ro.negative_text.encoder_hidden_states)
    other = rollout(shared_generator, PROMPTS, generator=_gen(8), guidance_scale=1.0, **kwargs)
    with pytest.raises(ValueError, match="guidance_scale"):
        Rollout.cat([ro, other])


def test_invalid_arguments_are_named(shared_generator):
    with pytest.raises(ValueError, match="stop_at"):
        rollout(shared_generator, PROMPTS, num_steps=STEPS, generator=_gen(), stop_at=STEPS + 1)
    with pytest.raises(ValueError, match="window"):
        rollout(shared_generator, PROMPTS, num_steps=STEPS, generator=_gen(), window=SDEWindow(3, 2))
    with pytest.raises(ValueError, match="Generator"):
        rollout(shared_generator, PROMPTS, num_steps=STEPS, generator=None)
    with pytest.raises(ValueError, match="one per image"):
        rollout(shared_generator, PROMPTS, num_steps=STEPS, generator=[_gen()], group_size=2)
    with pytest.raises(ValueError, match="method"):
        rollout(shared_generator, PROMPTS, num_steps=STEPS, generator=_gen(), method="ddim")


def test_policy_gradient_step_moves_log_probs_by_advantage_sign(tiny_generator):
    """The pieces a GRPO trainer chains: stored rollout -> recomputed log-probs -> clipped loss -> SGD step."""
    from rlkit.grpo import clipped_policy_loss

    ro = rollout(tiny_generator, PROMPTS, num_steps=STEPS, generator=_gen(12), window=SDEWindow(1, 1),
                 method="sde", noise_level=0.7)
    adv = torch.tensor([1.0, -1.0])
    params = [p for p in tiny_generator.transformer.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    new = step_log_probs(tiny_generator, ro, 0).log_prob
    loss, stats = clipped_policy_loss(new, ro.log_probs[:, 0], adv, clip_range=1.0)
    assert abs(stats["ratio_mean"].item() - 1.0) < 1e-5
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = step_log_probs(tiny_generator, ro, 0).log_prob
    delta = after - ro.log_probs[:, 0]
    assert delta[0] > 0 > delta[1], delta
