"""ReFL trainer on a tiny SD3 model with a latent reward (CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import rewards
from rlkit.config import ReFLConfig, recipe_from_dict
from rlkit.trainers.refl import combine_losses, reward_loss


def test_reward_losses_by_hand():
    r = torch.tensor([0.5, 3.0])
    assert torch.allclose(reward_loss(r, "margin", 2.0, 1.0), torch.tensor([1.5, -1.0]))
    assert torch.allclose(reward_loss(r, "neg", 2.0, 2.0), torch.tensor([-1.0, -6.0]))
    assert torch.allclose(reward_loss(r, "relu_margin", 2.0, 1e-3), torch.tensor([1.5e-3, 0.0]))
    l_r, l_p = torch.tensor(1.0), torch.tensor(4.0)
    assert combine_losses(l_r, l_p, 0.5).item() == pytest.approx((1 + 0.5 * 4) / 1.5)
    assert combine_losses(l_r, None, 0.5) is l_r


def tiny_recipe(tmp_path: Path, model_dir: Path, **refl) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square at the top\na green triangle on the left\na yellow cross\n")
    return {
        "algorithm": "refl",
        "name": "tiny",
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "model": {"pretrained": str(model_dir), "resolution": 32, "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8},
        "rewards": [{"name": "latent-direction", "args": {"seed": 1, "scale": 10.0}}],
        "prompts": {"source": str(prompts)},
        "optim": {"lr": 5e-3, "weight_decay": 0.0, "grad_clip": 10.0},
        "refl": {"num_steps": 4, "grad_step_range": [1, 3], "guidance_scale": 1.0, "batch_size": 2,
                 "max_steps": 2, "loss": "neg", **refl},
        "eval": {"prompts": str(prompts), "num_prompts": 2, "num_steps": 4, "batch_size": 2, "grid_images": 2},
        "logging": {"backends": ["jsonl"], "progress": False},
        "checkpoint": {"every": 1, "keep_last": 3},
    }


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_one_update_trains_exactly_the_policy_lora_and_never_decodes(tmp_path, tiny_sd3_dir, monkeypatch):
    from rlkit.models.sd3 import SD3Generator
    from rlkit.trainers.loop import PolicyRun

    decodes = []
    original = SD3Generator.decode
    monkeypatch.setattr(SD3Generator, "decode", lambda self, z: decodes.append(z.shape) or original(self, z))
    recipe = recipe_from_dict(tiny_recipe(tmp_path, tiny_sd3_dir, max_steps=1))
    run = PolicyRun.setup(recipe, total_updates=2, micro_batch=2, grad_accum=1)
    decodes.clear()  # the initial evaluation decodes for its image grid, training must not
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".policy." in n for n in trainable)
    # the last SD3 block is context_pre_only: its text-stream output is dropped, so the text queries
    # (add_q_proj) of that block cannot influence anything; every other LoRA weight must move
    last = run.model.config.num_layers - 1
    dead = {n for n in trainable if n.startswith(f"transformer_blocks.{last}.attn.add_q_proj.")}
    assert len(dead) == 2
    trainable -= dead

    from rlkit.trainers.refl import refl_forward

    # LoRA starts as a no-op (B = 0), so the first update moves only B; the second moves A too
    for step in range(2):
        rng = run.step_generator(step, 0)
        loss, stats = refl_forward(run.gen, run.model, run.reward, run.sample_prompts(rng, 2),
                                   run.global_noise(rng, 2), recipe.refl, k=2)
        run.backward(loss.mean())
        grads = {n: p.grad for n, p in run.model.named_parameters() if p.requires_grad}
        with_grad = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
        expected = trainable if step == 1 else {n for n in trainable if "lora_B" in n}
        assert with_grad == expected
        run.end_update(stats)
    assert decodes == [], "a latent reward must not decode through the VAE"
    changed = {n for n, p in run.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_the_recipes_decode_options_reach_refl_through_the_vae(tmp_path, tiny_sd3_dir, monkeypatch):
    """``model.decode``: a pixel reward's decode under ReFL recomputes the VAE in backward (one checkpointed
    decode per forward, none in the no-grad evaluation) and slices, with the gradient of a plain decode."""
    from rlkit.trainers.loop import PolicyRun
    from rlkit.trainers.refl import refl_forward

    checkpointed = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, *a, **kw: checkpointed.append(fn.__name__) or original(fn, *a, **kw))
    grads = {}
    for options in ({}, {"gradient_checkpointing": True, "slicing": True}):
        data = tiny_recipe(tmp_path / str(len(grads)), tiny_sd3_dir, max_steps=1)
        data["rewards"] = [{"name": "shapes-clip"}]
        data["model"]["decode"] = options
        recipe = recipe_from_dict(data)
        torch.manual_seed(0)
        run = PolicyRun.setup(recipe, total_updates=1, micro_batch=2, grad_accum=1)
        assert run.gen.vae.use_slicing == bool(options) and run.gen.decode_checkpointing == bool(options)
        checkpointed.clear()
        rng = run.step_generator(0, 0)
        loss, _ = refl_forward(run.gen, run.model, run.reward, run.sample_prompts(rng, 2), run.global_noise(rng, 2),
                               recipe.refl, k=2)
        loss.mean().backward()
        assert checkpointed == (["_decode"] if options else [])
        grads[bool(options)] = torch.cat([p.grad.flatten() for p in run.model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-6)


def test_setup_places_every_reward_on_the_accelerator_device_unless_its_args_name_one(tmp_path, tiny_sd3_dir,
                                                                                      placed_reward):
    """The training reward (here a mixture) and the golden rewards go where the policy computes; a reward
    whose args name a device stays there. (The Flow-GRPO trainer shares this set-up.)"""
    from rlkit.trainers.loop import PolicyRun

    data = tiny_recipe(tmp_path, tiny_sd3_dir, max_steps=1)
    data["rewards"] = [{"name": "test-placed", "weight": 0.5},
                       {"name": "test-placed", "weight": 0.5, "args": {"device": "cpu"}}]
    data["eval"]["golden"] = [{"name": "test-placed", "args": {"value": 2.0}}]
    run = PolicyRun.setup(recipe_from_dict(data), total_updates=1, micro_batch=2, grad_accum=1)
    device = torch.device(run.accelerator.device)
    free, pinned = run.reward.components
    assert free.moves == [device] and pinned.moves == []
    assert run.evaluator.golden["test-placed"].moves == [device]


def test_reward_on_noisy_states_needs_a_noise_aware_reward(tmp_path, tiny_sd3_dir):
    """Refused by the recipe's validation, before any weight loads, and by the trainer for a built reward."""
    from rlkit.config import ConfigError
    from rlkit.trainers.refl import check_reward

    data = tiny_recipe(tmp_path, tiny_sd3_dir, reward_at="state")
    data["rewards"] = [{"name": "shapes-clip"}]  # reads pixels: a noisy state would decode to noise
    message = r"refl.reward_at: state .* ShapesClipReward is not noise-aware; use reward_at: x0_hat"
    with pytest.raises(ConfigError, match=r"rewards\.0\.name: " + message):
        recipe_from_dict(data)
    with pytest.raises(ValueError, match=message):
        check_reward(rewards.build("shapes-clip"), ReFLConfig(reward_at="state"))


@pytest.mark.parametrize("scored, key", [
    ([{"name": "shapes-golden"}], "rewards.0"),
    ([{"name": "latent-direction", "args": {"seed": 1}}, {"name": "shapes-golden"}], "rewards.1"),  # a mixture
    ([{"name": "weighted", "args": {"components": [{"name": "latent-direction"}, {"name": "shapes-golden"}]}}],
     "rewards.0.args.components.1"),
])
def test_refl_refuses_a_reward_without_gradient(tmp_path, tiny_sd3_dir, scored, key):
    from rlkit.config import ConfigError, RewardSpec
    from rlkit.trainers.common import build_reward, require_differentiable

    data = tiny_recipe(tmp_path, tiny_sd3_dir)
    data["rewards"] = scored
    message = r"ReFL backpropagates the reward.*GoldenJudgeReward is not differentiable.*eval\.golden"
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}\.name: {message}"):
        recipe_from_dict(data)
    with pytest.raises(ValueError, match=rf"rewards: {message}"):  # the trainer's own check, on the built reward
        require_differentiable(build_reward([RewardSpec(**spec) for spec in scored]), "rewards")


def test_scoring_states_needs_a_reward_set_to_score_them(tmp_path, tiny_sd3_dir):
    """A noise-aware reward set to noise clean latents itself (DiNa-LRM's renoise and ensemble modes) is refused
    where the trainer hands it noisy states, by the recipe's validation and by the trainer; in mode state, or in a
    mixture of such rewards, it is taken."""
    import rewards
    from rewards.dina_lrm import DiNaLRMConfig
    from rewards.dina_lrm.reward import DiNaLRMReward
    from rewards.weighted import WeightedReward
    from rlkit.config import ConfigError
    from rlkit.trainers.common import require_noise_aware

    data = tiny_recipe(tmp_path, tiny_sd3_dir, reward_at="state")
    dina = {"name": "dina-lrm", "args": {"pretrained": "unused", "mode": "state"}}
    renoise = {**dina, "args": {"pretrained": "unused"}}  # the default mode
    for scored, key in [([renoise], "rewards.0"),
                        ([dina, {**dina, "args": {**dina["args"], "mode": "ensemble"}}], "rewards.1"),
                        ([{"name": "weighted", "args": {"components": [dina, renoise]}}],
                         "rewards.0.args.components.1")]:
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}\.args: refl\.reward_at: state .* DiNaLRMReward is "
                                              r"set to score clean latents .*mode: state"):
            recipe_from_dict({**data, "rewards": scored})
    for scored in ([dina], [{"name": "weighted", "args": {"components": [dina, {"name": "latent-direction"}]}}]):
        assert recipe_from_dict({**data, "rewards": scored}).rewards[0].name == scored[0]["name"]

    for mode in ("renoise", "ensemble"):
        reward = DiNaLRMReward(config=DiNaLRMConfig(), mode=mode)
        with pytest.raises(ValueError, match=r"refl.reward_at: state .* set to score clean latents .*mode: state"):
            require_noise_aware(reward, "refl")
    state = DiNaLRMReward(config=DiNaLRMConfig(), mode="state")
    require_noise_aware(state, "refl")
    toy = rewards.build("latent-direction", seed=1)
    mixed = WeightedReward([{"name": "a"}, {"name": "b"}], rewards_by_key={"a": state, "b": toy})
    require_noise_aware(mixed, "flow_grpo")
    state.options.mode = "renoise"  # the mixture follows its component's mode
    with pytest.raises(ValueError, match="set to score clean latents"):
        require_noise_aware(mixed, "flow_grpo")


def test_trust_region_adds_kl_beta_times_the_velocity_drift_from_the_base(tmp_path, tiny_sd3_dir):
    """kl_beta > 0 adds kl_beta |v - v_base|^2 per sample at the gradient-carrying steps, v_base being the
    LoRA-disabled model's velocity at the same state; it is zero while LoRA is a no-op, and its gradient alone
    pulls the policy back towards the base."""
    from rlkit.models.lora import use_adapter
    from rlkit.rollout import rollout
    from rlkit.trainers.common import reference_context
    from rlkit.trainers.loop import PolicyRun
    from rlkit.trainers.refl import refl_forward

    recipe = recipe_from_dict(tiny_recipe(tmp_path, tiny_sd3_dir, kl_beta=2.0, grad_steps=2))
    run = PolicyRun.setup(recipe, total_updates=1, micro_batch=2, grad_accum=1)
    cfg, k = recipe.refl, 1
    rng = run.step_generator(0, 0)
    prompts, noise = run.sample_prompts(rng, 2), run.global_noise(rng, 2)
    reference = reference_context(run)

    def forward(ref):
        return refl_forward(run.gen, run.model, run.reward, prompts, noise, cfg, k, reference=ref)

    loss, stats = forward(reference)
    assert stats["kl"] == 0.0 and torch.equal(loss, forward(None)[0])  # LoRA starts as a no-op (B = 0)
    with torch.no_grad():  # move the policy off the base
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    loss, stats = forward(reference)
    plain, _ = forward(None)

    # independent reference: the same states, policy and base velocities at steps k and k + 1
    sigmas = run.gen.sigmas(cfg.num_steps)
    with torch.no_grad():
        ro = rollout(run.gen, prompts, num_steps=cfg.num_steps, generator=None, latents=noise, guidance_scale=1.0,
                     stop_at=k, transformer=run.model)
        x, drift = ro.state, torch.zeros(2)
        for j in (k, k + 1):
            s = sigmas[j].expand(2)
            v = run.gen.velocity(x, s, ro.text, transformer=run.model)
            with use_adapter(run.model, None):
                v_base = run.gen.velocity(x, s, ro.text, transformer=run.model)
            drift += ((v - v_base) ** 2).flatten(1).mean(1)
            x = x + (sigmas[j + 1] - sigmas[j]) * v
    assert drift.min() > 0
    assert torch.allclose(loss - plain, 2.0 * drift, rtol=1e-4, atol=1e-7)
    assert stats["kl"] == pytest.approx(drift.mean().item(), rel=1e-4)

    # the drift term's own gradient is a descent direction for the drift: a step sized to cut the penalty by
    # 10% to first order cuts it by about that much
    params = [p for p in run.model.parameters() if p.requires_grad]
    penalty = (loss - plain).mean()  # the reward's gradients cancel: the same forward, with and without
    penalty.backward()
    grad_sq = sum((p.grad ** 2).sum() for p in params)
    eps = 0.1 * penalty.item() / grad_sq.item()
    with torch.no_grad():
        for p in params:
            p -= eps * p.grad
    assert 0.85 * stats["kl"] < forward(reference)[1]["kl"] < 0.95 * stats["kl"]


def test_trust_region_needs_lora_and_a_non_negative_beta(tmp_path, tiny_sd3_dir):
    from rlkit.config import ConfigError

    with pytest.raises(ConfigError, match=r"refl.kl_beta.*must be >= 0, got -0.5"):
        recipe_from_dict(tiny_recipe(tmp_path, tiny_sd3_dir, kl_beta=-0.5))
    data = tiny_recipe(tmp_path, tiny_sd3_dir, kl_beta=0.5)
    data["lora"] = {"enabled": False}
    with pytest.raises(ConfigError, match=r"refl.kl_beta.*needs lora.enabled"):
        recipe_from_dict(data)
    data["algorithm"], data["flow_grpo"] = "flow_grpo", {"kl_beta": 0.1}
    with pytest.raises(ConfigError, match=r"flow_grpo.kl_beta.*needs lora.enabled"):
        recipe_from_dict(data)


def bar_counts(console: str, desc: str) -> list[tuple[int, int]]:
    """``(done, total)`` of each drawing of the progress bar ``desc`` in captured console output."""
    return [(int(n), int(total)) for n, total in re.findall(rf"{desc}: +\d+%\|[^|]*\| (\d+)/(\d+) ", console)]


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, tiny_sd3_dir, capsys):
    """Bit-identical, the reward's running z-score statistics included (they went back to zero on resume)."""
    from rlkit.trainers import refl

    zscored = [{"name": "weighted", "args": {"components": [
        {"name": "latent-direction", "args": {"seed": 1, "scale": 10.0}, "normalize": "zscore"}]}}]
    override = [f"rewards={json.dumps(zscored)}"]
    full = recipe_from_dict(tiny_recipe(tmp_path / "a", tiny_sd3_dir, max_steps=3), override)
    refl.train(full)
    part = recipe_from_dict(tiny_recipe(tmp_path / "b", tiny_sd3_dir, max_steps=2),
                            override + ["logging.progress=true"])
    capsys.readouterr()
    refl.train(part)
    out, err = capsys.readouterr()
    # the console: a bar over the updates with the latest loss and reward, a line per evaluation
    assert bar_counts(err, "tiny")[::len(bar_counts(err, "tiny")) - 1] == [(0, 2), (2, 2)]
    assert "loss=" in err and "reward=" in err
    evaluations = [line for line in out.splitlines() if " eval: " in line]
    assert [line.split(" eval:")[0] for line in evaluations] == ["step 0", "step 2"]
    assert all("proxy/weighted " in line for line in evaluations)
    # the final checkpoint holds the final evaluation, which a run resumed from it need not repeat
    saved = torch.load(part.run_dir / "checkpoints" / "step_000002" / "trainer_extra.pt", weights_only=False)
    assert [step for step, _ in saved["evaluator"]["history"]] == [0, 2] and saved["elapsed_s"] > 0
    stored = (part.run_dir / "recipe.yaml").read_text()
    with pytest.raises(ValueError, match=r"resuming a run with other training settings \(optim.lr: 0.005 -> 0.001; "
                                         r"seed: 3 -> 4\)"):
        refl.train(recipe_from_dict(tiny_recipe(tmp_path / "b", tiny_sd3_dir, max_steps=3),
                                    override + ["seed=4", "optim.lr=1e-3"]))
    assert (part.run_dir / "recipe.yaml").read_text() == stored
    with (part.run_dir / "metrics.jsonl").open("a") as fh:  # what a run killed after step 2's checkpoint logged
        fh.write(json.dumps({"step": 3, "train/loss": 99.0}) + "\n")
    resumed = recipe_from_dict(tiny_recipe(tmp_path / "b", tiny_sd3_dir, max_steps=3),  # evaluated one at a time
                               override + ["logging.progress=true", "eval.batch_size=1"])
    refl.train(resumed)
    out, err = capsys.readouterr()
    assert bar_counts(err, "tiny")[::len(bar_counts(err, "tiny")) - 1] == [(2, 3), (3, 3)]  # from where it resumed
    assert [line.split(" eval:")[0] for line in out.splitlines() if " eval: " in line] == ["step 3"]
    from safetensors.torch import load_file

    a = load_file(full.run_dir / "export" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed.run_dir / "export" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    log = read_log(resumed.run_dir)
    assert any(r.get("resumed_from") == 2.0 for r in log)
    elapsed = [r["time/elapsed_s"] for r in log if "time/elapsed_s" in r]  # goes on across the resume
    assert len(elapsed) >= 3 and elapsed == sorted(elapsed) and elapsed[-1] > saved["elapsed_s"]
    final = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in (read_log(full.run_dir)[-1], log[-1])]
    assert final[0] and final[1] == pytest.approx(final[0], rel=1e-5)  # each sample's noise is its own
    assert [r["step"] for r in log if "train/loss" in r] == [1, 2, 3] and 99.0 not in [r["train/loss"] for r in log
                                                                                       if "train/loss" in r]


@pytest.mark.slow
def test_exported_lora_loads_into_diffusers_pipeline_and_matches_policy(tmp_path, tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    from rlkit.models.sd3 import SD3Generator
    from rlkit.rollout import sample
    from rlkit.trainers import refl

    recipe = recipe_from_dict(tiny_recipe(tmp_path / "r", tiny_sd3_dir, max_steps=2))
    refl.train(recipe)
    export = recipe.run_dir / "export"
    assert (export / "recipe.yaml").is_file()

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    base = SD3Generator(pipe, max_sequence_length=16)
    g = torch.Generator().manual_seed(0)
    before = sample(base, ["a red circle"], num_steps=4, guidance_scale=1.0, generator=g)
    pipe.load_lora_weights(export)
    g = torch.Generator().manual_seed(0)
    after = sample(base, ["a red circle"], num_steps=4, guidance_scale=1.0, generator=g)
    assert (after - before).abs().max() > 1e-4, "the LoRA changes the output"

    # the trained policy, rebuilt from the run's final checkpoint, samples the same latents
    from rlkit.trainers.loop import PolicyRun

    run = PolicyRun.setup(recipe, total_updates=2, micro_batch=2, grad_accum=1)
    assert run.step == 2
    g = torch.Generator().manual_seed(0)
    policy = sample(run.gen, ["a red circle"], num_steps=4, guidance_scale=1.0, generator=g)
    torch.testing.assert_close(after, policy, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_reward_rises_over_30_updates(tmp_path, tiny_sd3_dir, capsys):
    from rlkit.trainers import refl

    recipe = recipe_from_dict(tiny_recipe(tmp_path, tiny_sd3_dir, max_steps=30), ["checkpoint.every=0",
                                                                                "eval.every=0"])
    refl.train(recipe)
    curve = [r["train/reward"] for r in read_log(recipe.run_dir) if "train/reward" in r]
    assert len(curve) == 30
    print("ReFL reward curve:", " ".join(f"{x:.3f}" for x in curve))
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last > first + 0.05, f"reward did not rise: {first:.3f} -> {last:.3f}"


def test_pretrain_pool_is_at_the_recipes_resolution(tmp_path, tiny_sd3_dir, monkeypatch):
    """Base samples are drawn at model.resolution (not the transformer's default size) a micro-batch at a time; a
    latents file of another shape is refused, naming it."""
    from safetensors.torch import save_file

    import rlkit.rollout
    from rlkit.config import PretrainLossConfig
    from rlkit.trainers.loop import PolicyRun

    recipe = recipe_from_dict(tiny_recipe(tmp_path, tiny_sd3_dir, num_steps=2, grad_step_range=[0, 1]))
    run = PolicyRun.setup(recipe, total_updates=1, micro_batch=2, grad_accum=1)
    expected = run.gen.latent_shape(32)
    assert run.gen.transformer.config.sample_size * run.gen.vae_scale_factor != 32  # the default would differ
    batches = []
    original = rlkit.rollout.sample
    monkeypatch.setattr(rlkit.rollout, "sample", lambda gen, prompts, **kw: batches.append(len(prompts))
                        or original(gen, prompts, **kw))
    pool = run.pretrain_pool(PretrainLossConfig(weight=1.0), size=5)
    assert pool.latents.shape == (5, *expected) and len(pool.prompts) == 5
    assert batches == [2, 2, 1]  # refl.batch_size per sampling call

    path = tmp_path / "pool.safetensors"
    path.with_suffix(".txt").write_text("a red circle\na blue square\n")
    save_file({"latents": torch.randn(2, *expected)}, str(path))
    assert run.pretrain_pool(PretrainLossConfig(weight=1.0, source="data", data=str(path))).latents.shape == \
        (2, *expected)
    save_file({"latents": torch.randn(2, expected[0], 8, 8)}, str(path))
    with pytest.raises(ValueError, match=r"refl\.pretrain\.data .*pool\.safetensors.*\(4, 8, 8\), expected"):
        run.pretrain_pool(PretrainLossConfig(weight=1.0, source="data", data=str(path)))


def test_pretrain_regulariser_ema_and_early_stopping(tmp_path, tiny_sd3_dir):
    """lambda > 0 adds the flow-matching loss on base samples; EMA weights are what gets exported;
    a golden reward that falls for `patience` evaluations stops the run early."""
    from safetensors.torch import load_file

    from rlkit.trainers import refl
    from rlkit.trainers.loop import PolicyRun

    data = tiny_recipe(tmp_path, tiny_sd3_dir, max_steps=6, pretrain={"weight": 1.0, "source": "base_samples"})
    data["ema"] = {"enabled": True, "decay": 0.5, "update_every": 1}
    # golden = the negated proxy: it falls while the proxy rises, the signal early stopping watches for
    data["eval"].update(every=1, golden=[{"name": "latent-direction", "args": {"seed": 1, "scale": -1.0}}],
                        early_stopping_patience=2)
    recipe = recipe_from_dict(data)
    refl.train(recipe)
    log = read_log(recipe.run_dir)
    train = [r for r in log if "train/loss" in r]
    assert all("train/loss_pretrain" in r and r["train/loss_pretrain"] > 0 for r in train)
    for r in train:  # (L_reward + lambda L_pre) / (1 + lambda), lambda = 1, L_reward = -loss_scale * reward
        assert r["train/loss"] == pytest.approx((-recipe.refl.loss_scale * r["train/reward"]
                                                 + r["train/loss_pretrain"]) / 2, rel=1e-5, abs=1e-7)
    assert any(r.get("eval/early_stopped") == 1.0 for r in log)
    assert len(train) < 6, "early stopping ended the run before max_steps"
    checkpoints = sorted(p.name for p in (recipe.run_dir / "checkpoints").iterdir())
    refl.train(recipe)  # launched again, a run that stopped early stays stopped
    assert len([r for r in read_log(recipe.run_dir) if "train/loss" in r]) == len(train)
    assert sorted(p.name for p in (recipe.run_dir / "checkpoints").iterdir()) == checkpoints

    exported = load_file(recipe.run_dir / "export" / "pytorch_lora_weights.safetensors")
    run = PolicyRun.setup(recipe, total_updates=6, micro_batch=2, grad_accum=1)  # resumes the final checkpoint
    assert run.model.training  # as a fresh run after its first evaluation, not the eval mode it was loaded in
    raw = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    with run.ema.applied():
        ema = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(raw[n], ema[n]) for n in raw), "EMA differs from the raw weights"
    key = next(k for k in exported if "lora_B" in k)
    name = next(n for n in ema if "lora_B" in n and n.split(".lora_B")[0] in key.replace("transformer.", ""))
    torch.testing.assert_close(exported[key], ema[name])
