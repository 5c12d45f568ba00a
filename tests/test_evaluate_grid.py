"""The evaluation grid shows many prompts, not the first prompt's images only; every slot's scores are written
beside it, and a gain's standard error is paired by slot."""

from __future__ import annotations

import warnings

import pytest
from PIL import Image

from rewards.base import RewardInput
from rlkit.evaluate import EvalResult, Evaluator, grid_indices


@pytest.mark.parametrize("prompts, per_prompt, limit, expected", [
    (3, 2, 4, [0, 2, 4, 1]),  # every prompt's first image, then the second ones
    (3, 2, 10, [0, 2, 4, 1, 3, 5]),  # never more than there are samples
    (4, 1, 2, [0, 1]),
    (2, 3, 0, []),
])
def test_grid_takes_each_prompts_first_image_before_any_second(prompts, per_prompt, limit, expected):
    assert grid_indices(prompts, per_prompt, limit) == expected


def test_evaluator_grid_holds_the_picked_samples(tiny_generator, tmp_path, monkeypatch):
    import rlkit.runtime.images as images

    shown = {}

    def record(batch, path, captions=None, **kwargs):
        shown.update(n=batch.shape[0], captions=list(captions))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(path)

    monkeypatch.setattr(images, "save_image_grid", record)
    prompts = ["a red circle at the top", "a blue square at the left", "a green cross at the center"]
    evaluator = Evaluator(prompts, images_per_prompt=2, seed=0, num_steps=2, guidance_scale=1.0, golden={},
                          proxy={}, batch_size=4, resolution=32, grid_images=3)
    result = evaluator.run(tiny_generator, step=5, out_dir=tmp_path)
    assert result.images_path == tmp_path / "samples" / "step_000005.png" and result.images_path.is_file()
    assert shown == {"n": 3, "captions": prompts}


def test_two_ranks_share_the_evaluation_and_get_the_numbers_and_grid_of_one_process(tiny_generator, tmp_path,
                                                                                     monkeypatch, run_as_ranks):
    """Each rank samples and scores its batches only (rank 1, one batch short, repeats one to keep in step, as
    ZeRO-3 needs); the gathered scores and the grid are those of one process."""
    import threading

    import torch

    import rewards
    import rlkit.runtime.images as images
    from rlkit.evaluate import Shard

    grids, sampled = {}, []
    original = Evaluator._sample

    def record_grid(batch, path, captions=None, **kwargs):
        grids[path.parent.parent.name] = (batch.clone(), list(captions))

    def record_sample(self, gen, chunk, start, transformer):
        sampled.append((threading.current_thread().name, start))
        return original(self, gen, chunk, start, transformer)

    monkeypatch.setattr(images, "save_image_grid", record_grid)
    monkeypatch.setattr(Evaluator, "_sample", record_sample)
    prompts = ["a red circle at the top", "a blue square at the left", "a green cross at the center",
               "a yellow triangle", "a white circle on the right"]

    def evaluator() -> Evaluator:  # 10 slots in batches of 4: starts 0, 4, 8
        return Evaluator(prompts, images_per_prompt=2, seed=3, num_steps=2, guidance_scale=1.0,
                         golden={"judge": rewards.build("latent-direction", seed=1, scale=10.0)},
                         proxy={"proxy": rewards.build("latent-direction", seed=2, scale=1.0)},
                         batch_size=4, resolution=32, grid_images=6)

    one = evaluator().run(tiny_generator, step=1, out_dir=tmp_path / "one")
    assert sorted(start for _, start in sampled) == [0, 4, 8]
    sampled.clear()
    results = run_as_ranks(2, lambda rank, gather: evaluator().run(
        tiny_generator, step=1, out_dir=tmp_path / "two" if rank == 0 else None, shard=Shard(rank, 2, gather)))
    assert sorted(sampled) == [("rank0", 0), ("rank0", 8), ("rank1", 0), ("rank1", 4)]
    assert set(one.metrics) == {"eval/golden/judge", "eval/golden/judge_sem", "eval/golden/judge/raw",
                                "eval/proxy/proxy", "eval/proxy/proxy/raw"}
    for rank in (0, 1):
        assert results[rank].metrics == pytest.approx(one.metrics, rel=1e-6, abs=1e-7)
    assert results[1].images_path is None and results[0].images_path == tmp_path / "two" / "samples" / \
        "step_000001.png"
    assert set(grids) == {"one", "two"} and grids["two"][1] == grids["one"][1]
    assert torch.equal(grids["two"][0], grids["one"][0])
    from rlkit.evaluate import read_scores

    one_prompts, one_scores = read_scores(tmp_path / "one", 1)
    two_prompts, two_scores = read_scores(tmp_path / "two", 1)
    assert one_prompts == two_prompts == [p for p in prompts for _ in range(2)]
    assert set(one_scores) == {"golden/judge", "golden/judge/raw", "proxy/proxy", "proxy/proxy/raw"}
    for key, values in one_scores.items():  # the logged means are the slots' means
        assert values.shape == (10,) and values.mean().item() == pytest.approx(one.metrics[f"eval/{key}"], rel=1e-6)
        assert torch.allclose(two_scores[key], values, rtol=1e-6, atol=1e-7)
    assert one.metrics["eval/golden/judge_sem"] == pytest.approx(
        one_scores["golden/judge"].std().item() / 10 ** 0.5, rel=1e-6)
    assert not (tmp_path / "one" / "eval_scores" / "step_000002.json").exists() and read_scores(tmp_path, 2) is None
    with pytest.raises(ValueError, match="rank 2 of 2"):
        Shard(2, 2, lambda t: t)


def test_patience_counts_falls_of_the_first_golden_reward_and_ignores_evaluations_without_it():
    """A golden reward that joined on resume has no history: no KeyError, no fall counted until it has one."""
    from rlkit.evaluate import EvalResult

    def evaluator(history):
        return Evaluator(["p"], images_per_prompt=1, seed=0, num_steps=1, guidance_scale=1.0,
                         golden={"judge": None, "other": None}, proxy={}, patience=2,
                         history=[EvalResult(step, metrics) for step, metrics in history])

    older = evaluator([(0, {"eval/golden/other": 0.5}), (1, {"eval/golden/other": 0.6})])  # before "judge" joined
    older._update_patience(EvalResult(2, {"eval/golden/judge": 0.3}))
    assert older._bad_evals == 0 and not older.should_stop
    falls = evaluator([(0, {"eval/golden/judge": 0.5}), (1, {"eval/golden/judge": 0.4})])
    falls._bad_evals = 1
    falls._update_patience(EvalResult(2, {"eval/golden/judge": 0.45}))
    assert falls._bad_evals == 2 and falls.should_stop  # below the best (0.5) twice in a row
    falls._update_patience(EvalResult(3, {"eval/golden/judge": 0.5}))
    assert falls._bad_evals == 0


def test_a_gains_standard_error_is_that_of_the_per_slot_differences(tmp_path):
    """Two evaluations of the same slots: the error of the mean difference, which is far below the two means'
    errors taken as independent when the slots' scores move together; ``None`` when the slots differ."""
    import numpy as np
    import torch

    from rlkit.evaluate import gain_sem

    rng = np.random.default_rng(0)
    prompts = [f"prompt {i // 4}" for i in range(40)]
    before = rng.normal(size=40)
    after = before + 0.3 + 0.1 * rng.normal(size=40)  # the same slots, shifted: strongly paired
    for step, values in ((0, before), (50, after)):
        Evaluator._write_scores(tmp_path, step, prompts, {"golden/judge": torch.tensor(values, dtype=torch.float32)})
    se = gain_sem(tmp_path, "golden/judge", 0, 50)
    diff = after.astype(np.float32).astype(np.float64) - before.astype(np.float32).astype(np.float64)
    assert se == pytest.approx(diff.std(ddof=1) / np.sqrt(40), rel=1e-9)
    independent = np.hypot(before.std(ddof=1), after.std(ddof=1)) / np.sqrt(40)
    assert se < independent / 5
    assert gain_sem(tmp_path, "golden/judge", 0, 60) is None  # no evaluation at 60
    assert gain_sem(tmp_path, "golden/other", 0, 50) is None
    Evaluator._write_scores(tmp_path, 60, prompts[::-1], {"golden/judge": torch.tensor(after, dtype=torch.float32)})
    assert gain_sem(tmp_path, "golden/judge", 0, 60) is None  # other slots: nothing to pair


def test_a_slots_sample_and_scores_do_not_depend_on_the_batch_size(tiny_generator, tiny_sd3_dir, tmp_path):
    """Every slot draws its own sampler noise and its own reward noise (a DiNa-LRM ensemble here), so evaluations
    in batches of 1, 4 and 10 give each slot the same scores; another seed gives others."""
    import torch
    from test_dina_lrm import randomize_head, tiny_config

    import rewards
    from rewards.dina_lrm.reward import DiNaLRMReward
    from rlkit.evaluate import read_scores

    dina = DiNaLRMReward(config=tiny_config(), base_model=str(tiny_sd3_dir), mode="ensemble")
    dina.raw_scores(RewardInput(prompts=["a"], latents=torch.zeros(1, 4, 8, 8),
                                generator=torch.Generator().manual_seed(0)))  # materialises the backbone
    randomize_head(dina)
    prompts = ["a red circle at the top", "a blue square at the left", "a green cross at the center",
               "a yellow triangle", "a white circle on the right"]

    def evaluate(batch_size: int, seed: int = 3) -> dict:
        out = tmp_path / f"b{batch_size}_s{seed}"
        Evaluator(prompts, images_per_prompt=2, seed=seed, num_steps=2, guidance_scale=1.0,
                  golden={"judge": rewards.build("latent-direction", seed=1, scale=10.0)}, proxy={"dina": dina},
                  batch_size=batch_size, resolution=32, grid_images=0).run(tiny_generator, step=0, out_dir=out)
        return read_scores(out, 0)[1]

    one = evaluate(1)
    assert one["proxy/dina"].std() > 0
    for batch_size in (4, 10):
        scores = evaluate(batch_size)
        for key in ("golden/judge", "proxy/dina"):
            torch.testing.assert_close(scores[key], one[key], rtol=1e-4, atol=1e-5)
    other = evaluate(4, seed=4)
    assert not torch.allclose(other["golden/judge"], one["golden/judge"], atol=1e-3)


def test_a_zscored_mixture_is_evaluated_on_the_scale_of_the_first_evaluation(tiny_generator, tmp_path):
    """The running statistics move with training; the same policy evaluated before and after they moved gets the same
    held-out proxy (it had been raw before the first update and z-scored by the moving statistics after). A resumed
    evaluator keeps the base policy's scale; one resumed from a checkpoint without it keeps the running statistics."""
    import torch

    import rewards

    mix = rewards.build("weighted", components=[
        {"name": "latent-direction", "args": {"seed": 2, "scale": 3.0}, "normalize": "zscore", "key": "z"},
        {"name": "latent-direction", "args": {"seed": 3}, "weight": 0.5, "key": "plain"}])
    prompts = ["a red circle at the top", "a blue square at the left", "a green cross at the center"]

    def evaluator() -> Evaluator:
        return Evaluator(prompts, images_per_prompt=3, seed=5, num_steps=2, guidance_scale=1.0, golden={},
                         proxy={"mix": mix}, batch_size=4, resolution=32, grid_images=0)

    first = evaluator()
    before = first.run(tiny_generator, step=0).metrics
    assert first.reference["proxy/mix"].keys() == {"z"}
    plain = before["eval/proxy/mix/plain/score"]
    assert before["eval/proxy/mix"] == pytest.approx(0.5 * plain, abs=1e-6)  # the z-scored part centred on itself
    for seed in range(3):  # training batches far from the held-out samples move the running statistics
        latents = 5 + torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        mix(RewardInput(prompts=prompts * 2, latents=latents))
    assert int(mix.normalizers[0].count) == 18
    after = first.run(tiny_generator, step=1).metrics
    for key in ("eval/proxy/mix", "eval/proxy/mix/z/normalized", "eval/proxy/mix/plain/normalized"):
        assert after[key] == pytest.approx(before[key], abs=1e-6), key
    state = first.state_dict()

    with torch.no_grad():  # another policy: on the base policy's scale, its z-scored part moves off 0
        tiny_generator.transformer.proj_out.bias.add_(1.0)
    moved = first.run(tiny_generator, step=2).metrics
    assert abs(moved["eval/proxy/mix/z/normalized"]) > 0.1
    resumed = evaluator()
    resumed.load_state_dict(state)
    again = resumed.run(tiny_generator, step=2).metrics
    assert again["eval/proxy/mix"] == pytest.approx(moved["eval/proxy/mix"], abs=1e-6)

    old = evaluator()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old.load_state_dict({k: v for k, v in state.items() if k != "reference"})
    assert old.reference is None and any("running training statistics" in str(w.message) for w in caught)
    running = old.run(tiny_generator, step=2).metrics
    scale = mix.normalizers[0].var.sqrt().item() + 1e-6
    expected = (moved["eval/proxy/mix/z/score"] - mix.normalizers[0].mean.item()) / scale
    assert running["eval/proxy/mix/z/normalized"] == pytest.approx(expected, rel=1e-5)
    assert old.state_dict()["reference"] is None  # and so on through later resumes
    assert not any("noise" in str(w.message) for w in caught)


def test_a_run_resumed_from_before_per_sample_noise_is_told_its_curve_mixes_two_draws():
    """A state without a held-out reference comes from the rlkit that drew evaluation noise per batch; the step where
    the curve's per-batch part ends is kept through later evaluations and resumes."""
    def evaluator() -> Evaluator:
        return Evaluator(["a red circle"], images_per_prompt=1, seed=5, num_steps=2, guidance_scale=1.0, golden={},
                         proxy={}, grid_images=0)

    def load(state: dict) -> tuple[Evaluator, list[str]]:
        resumed = evaluator()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed.load_state_dict(state)
        return resumed, [str(w.message) for w in caught if "noise" in str(w.message)]

    old = {"history": [(0, {"eval/x": 1.0}), (4, {"eval/x": 2.0})], "bad_evals": 0}
    resumed, said = load(old)
    assert resumed.per_batch_until == 4 and len(said) == 1 and "up to step 4" in said[0]
    resumed.history += [EvalResult(8, {"eval/x": 2.5}), EvalResult(12, {"eval/x": 3.0})]  # evaluated after it
    again, said = load(resumed.state_dict())
    assert again.per_batch_until == 4 and len(said) == 1 and "up to step 4" in said[0]
    for state in ({**old, "reference": {}}, {"history": [], "bad_evals": 0}, evaluator().state_dict()):
        resumed, said = load(state)
        assert resumed.per_batch_until is None and said == []



def test_a_rewards_noise_is_not_the_samplers_starting_noise(tiny_generator):
    """Each slot's reward noise is a stream of its own: with seeds 2^32 apart (which a CPU generator folds together)
    a re-noising reward would have drawn the very noise its sample started from."""
    import torch

    from rewards.base import Reward, RewardOutput

    drawn = []

    class Probe(Reward):
        space = "latent"

        def forward(self, batch):
            noise = torch.stack([torch.randn(batch.latents.shape[1:], generator=g) for g in batch.generator])
            drawn.append(noise)
            return RewardOutput(scores=noise.flatten(1).mean(1))

    prompts = ["a red circle at the top", "a blue square at the left"]
    Evaluator(prompts, images_per_prompt=2, seed=5, num_steps=2, guidance_scale=1.0, golden={},
              proxy={"probe": Probe()}, batch_size=3, resolution=32, grid_images=0).run(tiny_generator, step=0)
    noise = torch.cat(drawn)
    start = torch.stack([torch.randn(noise.shape[1:], generator=torch.Generator().manual_seed(5 + i))  # the sampler's
                         for i in range(4)])
    assert noise.shape == start.shape and noise.shape[:2] == (4, 4)
    correlation = torch.corrcoef(torch.stack([noise.flatten(), start.flatten()]))[0, 1]
    assert abs(correlation) < 0.2 and not torch.allclose(noise, start)
    assert all(not torch.allclose(noise[i], noise[j]) for i in range(4) for j in range(i))  # and apart per slot
