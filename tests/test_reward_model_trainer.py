"""DiNa-LRM trainer: noise-level schemes, losses with labels, EMA; a tiny model trained on CPU to >= 95%
held-out accuracy at low noise with accuracy falling toward chance as the noise approaches 1; EMA weights
saved in the release layout and loaded back through the registry; a run stopped by SIGTERM resumes
bit-identically (skipping a truncated checkpoint); 2 processes (ZeRO-2, and ZeRO-3) = 1 process."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from rlkit.config import load_recipe, recipe_from_dict
from rlkit.data import load_pairs
from rlkit.runtime.checkpoint import step_dir_name
from rlkit.runtime.tracking import METRICS_FILE
from rlkit.trainers import reward_model as rm
from rlkit.trainers.common import lr_factor

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "dina_lrm_tiny.yaml"
TRAIN = "synthetic:pairs=512,seed=0,size=8,signal=1.0"
HELD_OUT = "synthetic:pairs=128,seed=1,size=8,signal=1.0"
CURVE_LEVELS = [0.1, 0.5, 0.9, 0.99, 1.0]
ADAM_EPS = 1e-4  # the distributed test's Adam eps (see there)


def tiny_overrides(tiny_dir, out_dir, steps: int) -> list[str]:
    return [f"model.pretrained={tiny_dir}", f"output_dir={out_dir}", f"reward_model.max_steps={steps}",
            f"reward_model.data.train={TRAIN}", f"reward_model.data.eval={HELD_OUT}", "reward_model.batch_size=8",
            "reward_model.eval_every=0", "optim.lr=3e-3", "optim.warmup_steps=5", "logging.every=1"]


# ------------------------------------------------------------------------------------------------ pure parts

def test_noise_level_schemes_follow_their_distributions_and_are_seeded():
    def draw(scheme, args=None, n=20000, seed=0):
        return rm.sample_noise_levels(scheme, n, torch.Generator().manual_seed(seed), args)

    u = draw("uniform")
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    assert torch.equal(u, draw("uniform")) and not torch.equal(u, draw("uniform", seed=1))
    ln = draw("logit_normal", {"mean": 1.0, "std": 0.5})
    assert abs(torch.logit(ln).mean() - 1.0) < 0.02 and abs(torch.logit(ln).std() - 0.5) < 0.02
    assert torch.equal(draw("constant", {"value": 0.25}, n=5), torch.full((5,), 0.25))
    b = draw("beta", {"alpha": 2.0, "beta": 6.0})
    assert abs(b.mean() - 0.25) < 0.01 and torch.equal(b, draw("beta", {"alpha": 2.0, "beta": 6.0}))
    mode = draw("mode", {"scale": 0.0})  # scale 0 is the identity map of a uniform draw
    assert torch.allclose(mode, 1 - draw("uniform"))
    power = draw("power", {"power": 3.0})  # U^3: E = 1/4, and the same uniform draw cubed
    assert abs(power.mean() - 0.25) < 0.01 and torch.equal(power, draw("uniform") ** 3)
    with pytest.raises(ValueError, match="do not apply to 'uniform'"):
        draw("uniform", {"mean": 0.0})


def test_snapping_to_the_scheduler_grid():
    from rewards.dina_lrm import sigma_grid, snap_sigmas

    grid = sigma_grid(1000, 3.0)
    snapped = snap_sigmas(torch.tensor([0.0, 0.4, 0.99999]), grid)
    assert snapped[0] == grid.min() and snapped[2] == 1.0
    assert abs(snapped[1] - 0.4) < 1e-3 and bool((grid == snapped[1]).any())


def test_pair_loss_hard_labels_equal_the_loss_family_and_ties_are_symmetric():
    from rewards.dina_lrm.losses import preference_loss

    s_pos, s_neg, sigma = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5]), torch.tensor([0.1, 0.5, 0.9])
    ones, ties = torch.ones(3), torch.full((3,), 0.5)
    for name in ("thurstone_calibrated", "thurstone_fixed", "bt", "bt_margin", "nll_calibrated"):
        assert torch.allclose(rm.pair_loss(name, s_pos, s_neg, sigma, ones), preference_loss(name, s_pos, s_neg, sigma))
    for name in ("thurstone_calibrated", "thurstone_fixed", "bt", "bt_margin", "nll_calibrated"):
        swapped = rm.pair_loss(name, s_neg, s_pos, sigma, ties)
        assert torch.allclose(rm.pair_loss(name, s_pos, s_neg, sigma, ties), swapped)
        d = torch.zeros(3, requires_grad=True)
        rm.pair_loss(name, d, torch.zeros(3), sigma, ties).backward()
        assert torch.allclose(d.grad, torch.zeros(3), atol=1e-6)  # a tie is satisfied by equal scores
        apart = torch.tensor([1.0, -1.0, 2.0], requires_grad=True)
        rm.pair_loss(name, apart, torch.zeros(3), sigma, ties).backward()
        assert (apart.grad * apart > 0).all()  # and pulls unequal ones together (the loss was flat for ties)


def test_recipe_rejects_timestep_args_of_another_scheme_and_a_negative_adversarial_eps():
    from rlkit.config import ConfigError

    with pytest.raises(ConfigError, match="reward_model.adversarial_eps: must be >= 0, got -0.1"):
        recipe_from_dict({"algorithm": "reward_model", "reward_model": {"data": {"train": TRAIN},
                                                                        "adversarial_eps": -0.1}})

    with pytest.raises(ConfigError, match="timestep_args.alpha"):
        recipe_from_dict({"algorithm": "reward_model", "reward_model": {
            "data": {"train": TRAIN}, "timestep_sampling": "logit_normal", "timestep_args": {"alpha": 1.0}}})


def test_adversarial_latents_step_eps_along_the_loss_gradient():
    weight = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def score(z):  # a smooth toy scorer, one score per latent
        return torch.tanh((z * weight[: len(z)]).flatten(1).sum(1) / 8)

    def loss_of(scores):
        return -(scores[0] - scores[1])

    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for eps in (1e-3, 0.05):
        moved = rm.adversarial_latents(score, latents, eps, loss_of)
        rms = (moved - latents).flatten(1).pow(2).mean(1).sqrt()
        assert torch.allclose(rms, torch.full((2,), eps), rtol=1e-5)  # every latent moves by eps (RMS)
        probe = latents.clone().requires_grad_(True)
        loss_of(score(probe)).backward()
        grad = probe.grad
        step = moved - latents
        cosine = F.cosine_similarity(step.flatten(1), grad.flatten(1), dim=1)
        assert torch.allclose(cosine, torch.ones(2), atol=1e-5)  # along each latent's own loss gradient
        with torch.no_grad():
            rise = loss_of(score(moved)) - loss_of(score(latents))
        first_order = (grad * step).sum()
        assert rise > 0
        if eps < 0.01:  # a small step raises the loss by the first-order prediction
            assert float(rise / first_order) == pytest.approx(1.0, abs=0.01)
    assert not moved.requires_grad


# ---------------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids oversubscription stalls on a shared 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tiny_sd3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_runs")
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_sd3_dir, out, steps=40) + [
        "reward_model.eval_every=20", "reward_model.eval_levels=[0.1]", "checkpoint.every=20",
        "checkpoint.keep_last=1"])
    run = rm.setup(recipe)
    init = [p.detach().clone() for p in run.params]
    rm.train_loop(run)
    curve = rm.evaluate(run, levels=CURVE_LEVELS)
    final = rm.finish(run)
    return run, init, curve, final


@pytest.mark.slow
def test_tiny_model_learns_the_signal_and_accuracy_falls_with_noise(trained):
    run, init, curve, final = trained
    acc = {u: curve[f"eval/accuracy_u={u:.2f}"] for u in CURVE_LEVELS}
    half = {u: curve[f"eval/accuracy_ties_half_u={u:.2f}"] for u in CURVE_LEVELS}
    print("\nheld-out accuracy by eval noise level (EMA weights):")
    for u in CURVE_LEVELS:
        print(f"  u={u:.2f}  accuracy={acc[u]:.3f}  ties-as-half={half[u]:.3f}")
    assert acc[0.1] >= 0.95
    assert half[0.1] >= half[0.9] + 0.1 and half[0.9] >= half[0.99] - 0.05
    assert half[0.99] < 0.8 and half[1.0] == 0.5  # at u = 1 both latents are the same noise: a tie
    assert final["eval/accuracy_u=0.10"] == acc[0.1]  # finish() evaluates the same EMA weights
    assert all(not torch.equal(a, p.detach()) for a, p in zip(init, run.params)), "every trainable tensor changes"


@pytest.mark.slow
def test_init_from_goes_on_from_an_exported_model_of_the_same_layout(trained, tiny_sd3_dir, tmp_path):
    run, *_ = trained
    final = run.run_dir / rm.FINAL_DIR
    overrides = tiny_overrides(tiny_sd3_dir, tmp_path, steps=1) + [f"reward_model.init_from={final}",
                                                                   "reward_model.model={}"]
    again = rm.setup(load_recipe(TINY_RECIPE, overrides))
    exported = torch.load(final / "checkpoint" / "rm_head.pt", weights_only=True)
    head = again.model.reward_head.state_dict()
    assert exported.keys() == head.keys() and all(torch.equal(exported[k], head[k].cpu()) for k in exported)
    assert again.model.has_lora and all(p.requires_grad for p in again.model.lora_parameters())
    with pytest.raises(ValueError, match=r"reward_model.trainable='head' but .* was saved as 'lora_head'"):
        rm.setup(load_recipe(TINY_RECIPE, overrides + ["reward_model.trainable=head", f"output_dir={tmp_path / 'b'}"]))


@pytest.mark.slow
def test_periodic_evaluation_and_checkpoints_in_the_release_layout(trained):
    run, *_ = trained
    evals = [h for h in run.history if "eval/accuracy_u=0.10" in h]
    assert [h["step"] for h in evals] == [20, 40]  # periodic, then finish()
    assert evals[1]["eval/accuracy_u=0.10"] >= evals[0]["eval/accuracy_u=0.10"] - 0.05
    kept = sorted(p.name for p in (run.run_dir / rm.CHECKPOINT_DIR).iterdir())
    assert kept == ["step_000040"]  # keep_last=1 removed step 20; finish() did not save step 40 again
    folder = run.run_dir / rm.CHECKPOINT_DIR / kept[0] / rm.EXPORT_DIR
    assert {p.name for p in (folder / "checkpoint").iterdir()} == {"backbone_lora", "rm_head.pt"}
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["num_transformer_layers"] == 2 and config["training"]["ema_decay"] == run.recipe.ema.decay


@pytest.mark.slow
def test_eval_harness_on_the_loaded_reward_reproduces_the_trainer_curve(trained, tiny_sd3_dir):
    import rewards
    from rlkit.eval_reward import evaluate_pairwise
    from rlkit.runtime.seeding import derive_seed

    run, _, curve, _ = trained
    reward = rewards.build("dina-lrm", pretrained=str(run.run_dir / rm.FINAL_DIR), base_model=str(tiny_sd3_dir))
    levels = CURVE_LEVELS[:3]  # rows 0..2: the same seeds as the first rows of the trainer's curve
    report = evaluate_pairwise(reward, run.eval_pairs, levels=levels, include_clean=False,
                               batch_size=run.cfg.eval_batch_size, seed=derive_seed(run.recipe.seed, "eval"),
                               progress=False)
    # level rows switch the renoise-mode reward to `state`; the margins equal the trainer's own evaluation
    for u in levels:
        assert report.row(f"u={u:.2f}").accuracy == curve[f"eval/accuracy_u={u:.2f}"]
    assert reward.options.mode == "renoise"
    report = evaluate_pairwise(reward, run.eval_pairs[:48], ensemble=[0.2, 0.5, 0.7], batch_size=16, progress=False)
    assert report.row("reward").accuracy >= 0.9  # renoise at u = 0.4, one eps per pair
    assert report.row("ensemble(0.2,0.5,0.7)").accuracy >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("trainable, files", [("head", {"rm_head.pt"}), ("full", {"full_model.pt"})])
def test_frozen_backbone_and_full_training_save_their_release_layouts(trainable, files, tiny_sd3_dir, tmp_path):
    from rewards.dina_lrm import load_dina_lrm
    from rlkit.models.sd3 import SD3Generator

    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_sd3_dir, tmp_path, steps=2) + [
        f"reward_model.trainable={trainable}", "reward_model.data.eval="])
    run = rm.setup(recipe)
    backbone = [p for n, p in run.model.named_parameters() if n.startswith("backbone.")]
    assert all(p.requires_grad == (trainable == "full") for p in backbone)
    assert not run.model.has_lora
    before = [p.detach().clone() for p in run.params]
    rm.train_loop(run)
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, run.params))
    rm.finish(run)
    folder = run.run_dir / rm.FINAL_DIR
    assert {p.name for p in (folder / "checkpoint").iterdir()} == files
    fresh = SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    loaded = load_dina_lrm(folder, fresh.transformer)
    with rm.ema_weights(run):
        for (name, a), b in zip(run.model.reward_head.state_dict().items(), loaded.reward_head.state_dict().values()):
            assert torch.allclose(a, b), name


@pytest.mark.slow
def test_trains_from_cached_latents_without_the_vae(tiny_sd3_dir, tiny_generator, tmp_path, capsys):
    from PIL import Image

    from rlkit.cache_latents import cache_latents
    from rlkit.data import BucketConfig

    records = []
    for i in range(8):
        for side, value in (("a", 200), ("b", 40)):
            Image.new("RGB", (16, 16), (value, 255 - value, (37 * i) % 255)).save(tmp_path / f"{i}{side}.png")
        records.append({"prompt": "a red circle", "path1": f"{i}a.png", "path2": f"{i}b.png"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cached = tmp_path / "latents.parquet"
    cache_latents(tmp_path / "pairs.jsonl", tiny_generator, cached, BucketConfig(sizes=[(16, 16)], min_pixels=0),
                  progress=False)
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_sd3_dir, tmp_path, steps=2) + [
        f"reward_model.data.train={cached}", f"reward_model.data.eval={cached}", "reward_model.batch_size=4"])
    run = rm.setup(recipe)
    run.gen.pipeline.vae = None  # training and evaluation must not need it
    capsys.readouterr()
    rm.train_loop(run)
    metrics = rm.finish(run)
    assert run.step == 2 and all(math.isfinite(h["loss"]) for h in run.history if "loss" in h)
    assert metrics["eval/accuracy_u=0.10"] * 8 in range(9)  # a fraction of the 8 cached pairs, every one scored
    out, err = capsys.readouterr()  # the console: the bar with loss and accuracy, the final evaluation's line
    assert re.search(rf"{recipe.name}: +100%\|[^|]*\| 2/2 .*loss=.*acc=", err)
    assert f"step 2 eval: accuracy_u=0.10 {metrics['eval/accuracy_u=0.10']:.4g}" in out


def test_train_sources_are_concatenated_and_drawn_pairs_are_encoded_by_the_generator(tiny_sd3_dir, tmp_path):
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_sd3_dir, tmp_path, steps=1) + [
        f"reward_model.data.train=['{TRAIN}', shapes:drawn:6:3]", "reward_model.data.eval=shapes:drawn:4"])
    run = rm.setup(recipe)
    synthetic = load_pairs(TRAIN)
    assert len(run.train_pairs) == len(synthetic) + 6 and len(run.eval_pairs) == 4
    drawn = run.train_pairs[len(synthetic):]
    assert all(p.kind == "latent" and p.label == 1.0 and p.file == "shapes:drawn:6:3" for p in drawn)
    # the generator's VAE encoded them: latents of its latent shape, the right picture differing from the wrong one
    assert drawn[0].shapes[0] == tuple(run.gen.encode(torch.zeros(1, 3, 32, 32)).shape[1:])
    assert all(not torch.equal(p.chosen, p.rejected) for p in drawn)
    bad = load_recipe(TINY_RECIPE, tiny_overrides(tiny_sd3_dir, tmp_path, steps=1) + [
        "reward_model.data.train=shapes:drawn:many"])
    with pytest.raises(ValueError, match=r"reward_model.data.train: .*shapes:drawn:<pairs>"):
        rm.setup(bad)


@pytest.mark.slow
def test_bf16_backbone_trains_fp32_weights_under_autocast(tiny_sd3_dir, tmp_path, fresh_accelerate_state):
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_sd3_dir, tmp_path, steps=3) + [
        "model.dtype=bf16", "launch.mixed_precision=bf16", "reward_model.data.eval="])
    run = rm.setup(recipe)
    assert next(run.model.tapped_backbone.transformer_blocks.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in run.params)
    before = [p.detach().clone() for p in run.params]
    rm.train_loop(run)
    assert all(math.isfinite(h["loss"]) for h in run.history)
    assert sum(not torch.equal(b, p.detach()) for b, p in zip(before, run.params)) == len(before)


def test_gradient_checkpointing_recomputes_the_blocks_with_the_same_gradients(tiny_sd3_dir, tmp_path,
                                                                             checkpoint_calls):
    """``model.gradient_checkpointing`` reaches the reward model's own copy of the blocks (it had been ignored)."""
    from rlkit.models.sd3 import SD3Generator

    recorded = checkpoint_calls
    grads = {}
    for on in (False, True):
        gen = SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=16)  # the model trains its blocks
        text = gen.encode_prompts(["a red circle", "a blue square"])
        x = torch.randn(2, *gen.latent_shape(32), generator=torch.Generator().manual_seed(0))
        sigmas = torch.tensor([0.3, 0.7])
        recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_sd3_dir, tmp_path, steps=1)
                             + [f"model.gradient_checkpointing={str(on).lower()}"])
        torch.manual_seed(0)
        model = rm._build_model(recipe, gen)
        assert model.gradient_checkpointing is on
        recorded.clear()
        model.score(x, sigmas, text).sum().backward()
        assert len(recorded) == (model.config.num_transformer_layers if on else 0)
        grads[on] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for plain, checkpointed in zip(grads[False], grads[True]):
        torch.testing.assert_close(plain, checkpointed)


@pytest.mark.slow
def test_lr_follows_warmup_then_schedule_as_logged(trained):
    run, *_ = trained
    lrs = [h["lr"] for h in run.history if "lr" in h]
    base, warmup = run.recipe.optim.lr, run.recipe.optim.warmup_steps
    want = [base * lr_factor(k, warmup, run.total_steps, run.recipe.optim.schedule) for k in range(run.total_steps)]
    assert lrs == pytest.approx(want, rel=1e-9)
    assert lrs[0] == pytest.approx(base / warmup) and lrs[warmup - 1] == pytest.approx(base)
    lines = (run.run_dir / METRICS_FILE).read_text().splitlines()
    assert [json.loads(x)["lr"] for x in lines if '"lr"' in x] == pytest.approx(want)


@pytest.mark.slow
def test_ema_differs_from_raw_and_is_what_is_saved(trained):
    run, *_ = trained
    head = torch.load(run.run_dir / rm.FINAL_DIR / "checkpoint" / "rm_head.pt", weights_only=True)
    shadow = {id(p): s for p, s in zip(run.ema.params, run.ema.shadow)}
    differs = 0
    for name, p in run.model.reward_head.named_parameters():
        assert torch.allclose(head[name], shadow[id(p)]), name
        differs += int(not torch.allclose(head[name], p.detach()))
    assert differs > 0.5 * len(head)
    from safetensors.torch import load_file

    lora = load_file(run.run_dir / rm.FINAL_DIR / "checkpoint" / "backbone_lora" / "adapter_model.safetensors")
    assert lora and (run.run_dir / rm.FINAL_DIR / "config.json").is_file()


def attacked_accuracy(run, eps: float, u: float = 0.1) -> float:
    """Held-out pairwise accuracy (EMA weights) once every pair's noisy latents are moved ``eps`` against the model
    (``eps`` 0: the plain accuracy)."""
    from rewards.base import TextConditioning
    from rlkit.data import collate_pairs

    batch = collate_pairs(run.eval_pairs)
    noise = torch.randn(batch.chosen.shape, generator=torch.Generator().manual_seed(5))
    sigma = torch.full((len(batch.prompts),), u)
    noisy = torch.cat([(1 - u) * batch.chosen + u * noise, (1 - u) * batch.rejected + u * noise])
    text = run.gen.encode_prompts(batch.prompts)
    text, t = TextConditioning.cat([text, text]), 1000.0 * torch.cat([sigma, sigma])

    def loss_of(scores):
        return rm.pair_loss(run.cfg.loss, *scores.chunk(2), sigma, batch.labels)

    with rm.ema_weights(run):
        run.model.eval()
        latents = rm.adversarial_latents(lambda z: run.model(z, t, text), noisy, eps, loss_of) if eps else noisy
        with torch.no_grad():
            chosen, rejected = run.model(latents, t, text).chunk(2)
        run.model.train()
    return float((chosen > rejected).float().mean())


@pytest.mark.slow
def test_adversarial_training_keeps_accuracy_and_resists_the_attack_it_trains_on(trained, tiny_sd3_dir, tmp_path):
    plain = trained[0]
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(tiny_sd3_dir, tmp_path, steps=40) + [
        "reward_model.adversarial_eps=0.1"])
    robust = rm.setup(recipe)
    rm.train_loop(robust)
    logged = [r["adversarial_accuracy"] for r in robust.history]
    assert len(logged) == 40 and not any("adversarial_accuracy" in r for r in plain.history)
    assert sum(logged[-10:]) / 10 > sum(logged[:10]) / 10 + 0.2  # it learns to rank the attacked pairs too
    (plain_clean, plain_attacked), (robust_clean, robust_attacked) = (
        [attacked_accuracy(r, eps) for eps in (0.0, 0.1)] for r in (plain, robust))
    print(f"\nheld-out accuracy, clean / attacked at eps 0.1: plain {plain_clean:.3f} / {plain_attacked:.3f}, "
          f"adversarial {robust_clean:.3f} / {robust_attacked:.3f}")
    assert plain_clean >= 0.95 and robust_clean >= 0.95
    assert robust_attacked >= plain_attacked + 0.06


@pytest.mark.slow
def test_checkpoint_loads_through_the_registry_and_scores_the_same(trained, tiny_sd3_dir):
    import rewards
    from rewards.base import RewardInput
    from rlkit.data import collate_pairs

    run, *_ = trained
    reward = rewards.build("dina-lrm", pretrained=str(run.run_dir / rm.FINAL_DIR), base_model=str(tiny_sd3_dir),
                           mode="state")
    batch = collate_pairs(run.eval_pairs[:6])
    sigmas = torch.full((6,), 0.3)
    with torch.no_grad():
        loaded = reward(RewardInput(prompts=batch.prompts, latents=batch.chosen, sigmas=sigmas)).scores
        with rm.ema_weights(run):
            ours = run.model.score(batch.chosen, sigmas, run.gen.encode_prompts(batch.prompts))
    assert torch.allclose(loaded, ours, atol=1e-5), (loaded, ours)
    # the checkpoint names the generator it was trained on, and scores with it when no base model is given
    config = json.loads((run.run_dir / rm.FINAL_DIR / "config.json").read_text())
    assert config["model"]["backbone_model_id"] == str(tiny_sd3_dir)
    alone = rewards.build("dina-lrm", pretrained=str(run.run_dir / rm.FINAL_DIR), mode="state")
    with torch.no_grad():
        assert torch.equal(alone(RewardInput(prompts=batch.prompts, latents=batch.chosen, sigmas=sigmas)).scores,
                           loaded)


# -------------------------------------------------------------------------------------------- resume

RESUME_STEPS, STOP_AT = 5, 3


def resume_recipe(tiny_dir, out_dir):
    """40 pairs = 5 global batches of 8 per epoch; 2 per step: the stop at step 3 lands inside epoch 1."""
    return load_recipe(TINY_RECIPE, tiny_overrides(tiny_dir, out_dir, steps=RESUME_STEPS) + [
        "reward_model.data.train=synthetic:pairs=40,seed=0,size=8,signal=1.0", "reward_model.data.eval=",
        "reward_model.grad_accum=2", "checkpoint.every=2", "checkpoint.keep_last=2", "optim.warmup_steps=2"])


def _state(run):
    return [p.detach().clone() for p in run.params], [s.clone() for s in run.ema.shadow]


def _losses(history, after=0):
    return {h["step"]: h["loss"] for h in history if "loss" in h and h["step"] > after}


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd3_dir, tmp_path_factory):
    run = rm.setup(resume_recipe(tiny_sd3_dir, tmp_path_factory.mktemp("rm_full")))
    rm.train_loop(run)
    rm.finish(run)
    return _state(run), _losses(run.history)


@pytest.fixture(scope="module")
def killed(tiny_sd3_dir, tmp_path_factory):
    """The same recipe sent SIGTERM during step STOP_AT: it checkpoints after that step and exits.
    Returns the output folder (tests copy it before resuming) and the losses logged before the stop."""
    out = tmp_path_factory.mktemp("rm_killed")
    run = rm.setup(resume_recipe(tiny_sd3_dir, out))
    optimizer_step = rm._optimizer_step

    def signalled(r):
        if r.step + 1 == STOP_AT:
            os.kill(os.getpid(), signal.SIGTERM)  # the guard's handler only sets its flag
        return optimizer_step(r)

    patch = pytest.MonkeyPatch()
    patch.setattr(rm, "_optimizer_step", signalled)
    try:
        with pytest.raises(SystemExit) as stopped:
            rm.train_loop(run)
    finally:
        patch.undo()
    assert str(stopped.value.code).startswith(f"stopped by signal after step {STOP_AT}") and run.step == STOP_AT
    assert signal.getsignal(signal.SIGTERM) != run.guard._on_signal  # the stop closed the guard
    return out, _losses(run.history)


def _copy_run(out, to):
    shutil.copytree(out / "dina_lrm_tiny", to / "dina_lrm_tiny")
    return to / "dina_lrm_tiny"


@pytest.mark.slow
def test_resume_after_sigterm_is_bit_identical_to_the_uninterrupted_run(killed, uninterrupted, tiny_sd3_dir,
                                                                      tmp_path):
    out, before = killed
    (weights, shadow), losses = uninterrupted
    root = _copy_run(out, tmp_path) / rm.CHECKPOINT_DIR
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003"]  # periodic, then the stop
    assert (root / "step_000003" / rm.EXPORT_DIR / "config.json").is_file()
    assert before == {s: losses[s] for s in range(1, STOP_AT + 1)}
    run = rm.setup(resume_recipe(tiny_sd3_dir, tmp_path))
    assert (run.step, run.epoch, run.batches_taken) == (STOP_AT, 1, 1)  # 6 batches taken of 5 per epoch
    rm.train_loop(run)
    rm.finish(run)
    got_weights, got_shadow = _state(run)
    assert len(got_weights) == len(weights) > 0
    assert all(torch.equal(a, b) for a, b in zip(got_weights, weights))
    assert all(torch.equal(a, b) for a, b in zip(got_shadow, shadow))
    assert _losses(run.history) == {s: v for s, v in losses.items() if s > STOP_AT}
    assert list(_losses(run.history)) == [4, 5]
    rows = list(map(json.loads, (run.run_dir / METRICS_FILE).open()))
    assert any(r.get("resumed_from") == STOP_AT for r in rows)
    elapsed = [r["time/elapsed_s"] for r in rows if "time/elapsed_s" in r]
    assert len(elapsed) >= 5 and elapsed == sorted(elapsed)  # the training time goes on across the resume
    assert sorted(p.name for p in (run.run_dir / rm.CHECKPOINT_DIR).iterdir()) == ["step_000004", "step_000005"]


@pytest.mark.slow
def test_a_run_whose_every_checkpoint_is_truncated_is_refused_and_keeps_its_log(killed, tiny_sd3_dir, tmp_path):
    """Starting afresh would drop the killed run's logged metrics; the user restores a checkpoint or says so."""
    out, _ = killed
    folder = _copy_run(out, tmp_path)
    for step in (folder / rm.CHECKPOINT_DIR).iterdir():
        biggest = max((p for p in step.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    logged = (folder / METRICS_FILE).read_text()
    assert logged.count("\n") >= STOP_AT
    with pytest.warns(UserWarning, match="truncated"), pytest.raises(
            ValueError, match=r"none of its checkpoints \(step_000002, step_000003\) is complete.*resume=false"):
        rm.setup(resume_recipe(tiny_sd3_dir, tmp_path))
    assert (folder / METRICS_FILE).read_text() == logged


@pytest.mark.slow
def test_resume_skips_a_truncated_checkpoint(killed, uninterrupted, tiny_sd3_dir, tmp_path):
    out, _ = killed
    (weights, _), losses = uninterrupted
    newest = _copy_run(out, tmp_path) / rm.CHECKPOINT_DIR / "step_000003"
    biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="skipping incomplete or truncated checkpoint"):
        run = rm.setup(resume_recipe(tiny_sd3_dir, tmp_path))
    assert (run.step, run.epoch, run.batches_taken) == (2, 0, 4)
    rm.train_loop(run)
    assert all(torch.equal(a, b) for a, b in zip(run.params, weights))
    assert _losses(run.history) == {s: v for s, v in losses.items() if s > 2}
    run.tracker.close()
    run.guard.close()


# ------------------------------------------------------------------------------------------ distributed

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage,adversarial_eps", [(2, 0.0), (2, 0.05), (3, 0.05)])
def test_two_processes_under_zero_equal_one_process_on_the_same_global_batch(stage, adversarial_eps, tiny_sd3_dir,
                                                                             tmp_path):
    base = yaml.safe_load(TINY_RECIPE.read_text())
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base))
    held_out = "synthetic:pairs=40,seed=1,size=8,signal=1.0"  # 5 evaluation batches: 3 on rank 0, 2 on rank 1
    common = [o for o in tiny_overrides(tiny_sd3_dir, tmp_path, steps=3) if "batch_size" not in o] + [
        f"reward_model.data.eval={held_out}", "reward_model.eval_batch_size=8", "optim.warmup_steps=1",
        "ema.decay=0.5", f"optim.eps={ADAM_EPS}", f"reward_model.adversarial_eps={adversarial_eps}"]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    one = subprocess.run([sys.executable, "-m", "rlkit", str(path), *common, "name=one", "reward_model.batch_size=4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "rlkit", "train", str(path), *common, "name=two",
                          "reward_model.batch_size=2", "launch.num_processes=2", f"launch.deepspeed={stage}",
                          f"launch.main_process_port={_free_port()}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(name):
        lines = (tmp_path / name / METRICS_FILE).read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if '"loss"' in x]

    l1, l2 = losses("one"), losses("two")
    assert len(l1) == 3 and l2 == pytest.approx(l1, rel=1e-4)  # logged losses are global-batch means
    ckpt = Path("checkpoint")
    h1 = torch.load(tmp_path / "one" / rm.FINAL_DIR / ckpt / "rm_head.pt", weights_only=True)
    h2 = torch.load(tmp_path / "two" / rm.FINAL_DIR / ckpt / "rm_head.pt", weights_only=True)
    assert h1.keys() == h2.keys()
    # the checkpoint holds the same EMA export (gathered on every rank under ZeRO-3), and nothing staged is left
    checkpoints = tmp_path / "two" / rm.CHECKPOINT_DIR
    assert [p.name for p in checkpoints.iterdir()] == [step_dir_name(3)]
    inside = torch.load(checkpoints / step_dir_name(3) / rm.EXPORT_DIR / ckpt / "rm_head.pt", weights_only=True)
    assert all(torch.equal(inside[k], h2[k]) for k in h2)
    # Adam normalises each element's update: with eps 1e-8, all-reduce rounding (~1e-9) in elements whose
    # gradient is ~0 flips whole lr-sized steps. A larger eps keeps such updates proportional to the gradient.
    tol = dict(atol=2e-5, rtol=0.0)
    moved = 0
    for k in h1:
        assert torch.allclose(h1[k], h2[k], **tol), (k, (h1[k] - h2[k]).abs().max())
    from safetensors.torch import load_file

    a1 = load_file(tmp_path / "one" / rm.FINAL_DIR / ckpt / "backbone_lora" / "adapter_model.safetensors")
    a2 = load_file(tmp_path / "two" / rm.FINAL_DIR / ckpt / "backbone_lora" / "adapter_model.safetensors")
    for k in a1:
        assert torch.allclose(a1[k], a2[k], **tol), (k, (a1[k] - a2[k]).abs().max())
        moved += int("lora_B" in k and a1[k].abs().max() > 1e-5)
    assert moved > 0  # lora_B starts at zero: training moved the adapter
    # the final held-out evaluation (each rank scored its share under ZeRO-2, both the whole set under ZeRO-3) is
    # the one process's evaluation of the exported weights, pair for pair
    import rewards
    from rlkit.eval_reward import evaluate_pairwise
    from rlkit.runtime.seeding import derive_seed

    logged = [json.loads(x) for x in (tmp_path / "two" / METRICS_FILE).read_text().splitlines() if '"eval/' in x][-1]
    reward = rewards.build("dina-lrm", pretrained=str(tmp_path / "two" / rm.FINAL_DIR), base_model=str(tiny_sd3_dir))
    levels = base["reward_model"]["eval_levels"]
    report = evaluate_pairwise(reward, load_pairs(held_out), levels=levels, include_clean=False, batch_size=8,
                               seed=derive_seed(base["seed"], "eval"), progress=False)
    assert {f"eval/accuracy_u={u:.2f}": report.row(f"u={u:.2f}").accuracy for u in levels} == {
        k: v for k, v in logged.items() if k.startswith("eval/accuracy_u=")}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("ema", [True, False])
def test_a_bf16_deepspeed_run_exports_its_float32_weights(ema, tiny_sd3_dir, tmp_path):
    """Under DeepSpeed with bf16 the module holds rounded copies of the optimiser's fp32 masters; the export holds
    the float32 values (the EMA's average, or the masters), which a bf16 copy could not hold."""
    from safetensors.torch import load_file

    path = tmp_path / "r.yaml"
    path.write_text(TINY_RECIPE.read_text())
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    overrides = [o for o in tiny_overrides(tiny_sd3_dir, tmp_path, steps=2) if "batch_size" not in o] + [
        "reward_model.batch_size=2", "reward_model.data.eval=", "name=bf16", f"ema.enabled={str(ema).lower()}",
        "launch.mixed_precision=bf16", "launch.num_processes=2", "launch.deepspeed=2",
        f"launch.main_process_port={_free_port()}"]
    proc = subprocess.run([sys.executable, "-m", "rlkit", "train", str(path), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "bf16" / rm.FINAL_DIR / "checkpoint"
    head = torch.load(folder / "rm_head.pt", weights_only=True)
    lora = load_file(folder / "backbone_lora" / "adapter_model.safetensors")
    for part in (head, lora):
        assert {v.dtype for v in part.values()} == {torch.float32}
        assert any(not torch.equal(v, v.bfloat16().float()) for v in part.values())
