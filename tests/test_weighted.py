"""Weighted reward mixtures: construction from specs, normalisations, capability flags, shared decode."""

from __future__ import annotations

import pytest
import torch

import rewards
from rewards.base import MemoDecode, Reward, RewardInput, RewardOutput
from rewards.weighted import NormalizeSpec, ScoreNormalizer

PROMPTS = ["a red circle", "a blue square", "a star", "two rings"]


class FixedScores(Reward):
    """A pixel reward returning given scores (the mean pixel added, so it really reads the images)."""

    space = "pixel"
    noise_aware = False
    differentiable = False

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)
        self.attached = None

    def attach_generator(self, generator):
        self.attached = generator

    def forward(self, batch):
        pixels = batch.pixels()
        return RewardOutput(scores=self.scores + 0 * pixels.mean(dim=(1, 2, 3)), extras={"raw": self.scores})


@pytest.fixture(scope="module")
def tiny_pickscore_dir(tmp_path_factory):
    from rewards.tiny import save_tiny_pickscore

    return save_tiny_pickscore(tmp_path_factory.mktemp("pickscore") / "clip")


@pytest.fixture(scope="module")
def tiny_hpsv3(tmp_path_factory):
    from rewards.tiny import save_tiny_hpsv3

    return save_tiny_hpsv3(tmp_path_factory.mktemp("hpsv3") / "qwen2vl")


def _pixel_components(pickscore_dir, hpsv3):
    base, checkpoint = hpsv3
    return [
        {"name": "pickscore", "weight": 1.0, "args": {"model": str(pickscore_dir), "processor": str(pickscore_dir)},
         "normalize": {"kind": "affine", "scale": 26.0}},
        {"name": "hpsv3", "weight": 0.5, "normalize": "zscore",
         "args": {"model": str(base), "checkpoint": str(checkpoint), "dtype": "fp32", "pixels": 256}},
    ]


def _latents(gen, b=2, seed=0):
    return torch.randn(b, *gen.latent_shape(16), generator=torch.Generator().manual_seed(seed))


def test_two_pixel_rewards_decode_once(tiny_pickscore_dir, tiny_hpsv3, tiny_generator):
    mix = rewards.build("weighted", components=_pixel_components(tiny_pickscore_dir, tiny_hpsv3))
    assert mix.space == "pixel" and mix.differentiable and not mix.noise_aware
    latents = _latents(tiny_generator).requires_grad_()
    decode = MemoDecode(tiny_generator.decode)
    out = mix(RewardInput(prompts=PROMPTS[:2], latents=latents, decode=decode))
    assert decode.calls == 1
    assert out.scores.shape == (2,)
    for key in ("pickscore/raw", "pickscore/score", "pickscore/normalized", "hpsv3/raw", "hpsv3/sigma"):
        assert out.extras[key].shape == (2,)
    torch.testing.assert_close(out.extras["pickscore/normalized"], out.extras["pickscore/raw"] / 26.0)
    expected = 1.0 * out.extras["pickscore/normalized"] + 0.5 * out.extras["hpsv3/normalized"]
    torch.testing.assert_close(out.scores.detach(), expected)
    out.scores.sum().backward()  # ReFL through both rewards and the one decode
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_attached_generator_decodes_once_when_batch_has_no_decoder(tiny_generator):
    comps = [FixedScores([1.0, 2.0]), FixedScores([3.0, 5.0])]
    mix = rewards.build("weighted", components=[{"name": "a"}, {"name": "b"}], rewards_by_key=dict(zip("ab", comps)))
    calls = []

    class CountingGenerator:
        def decode(self, latents):
            calls.append(1)
            return tiny_generator.decode(latents)

    gen = CountingGenerator()
    mix.attach_generator(gen)
    assert all(c.attached is gen for c in comps)
    out = mix(RewardInput(prompts=PROMPTS[:2], latents=_latents(tiny_generator)))
    assert len(calls) == 1
    torch.testing.assert_close(out.scores, torch.tensor([4.0, 7.0]))
    assert not mix.differentiable


def test_latent_only_mixture_never_decodes(tiny_generator):
    mix = rewards.build("weighted", components=[
        {"name": "latent-direction", "weight": 2.0, "args": {"seed": 1}},
        {"name": "latent-direction", "weight": -1.0, "args": {"seed": 2}, "normalize": "none"},
    ])
    assert mix.space == "latent" and mix.noise_aware and mix.differentiable
    assert mix.keys == ["latent-direction", "latent-direction#1"]
    decode = MemoDecode(tiny_generator.decode)
    latents = _latents(tiny_generator, b=3)
    out = mix(RewardInput(prompts=PROMPTS[:3], latents=latents, decode=decode))
    assert decode.calls == 0
    a = rewards.build("latent-direction", seed=1)(RewardInput(prompts=PROMPTS[:3], latents=latents)).scores
    b = rewards.build("latent-direction", seed=2)(RewardInput(prompts=PROMPTS[:3], latents=latents)).scores
    torch.testing.assert_close(out.scores, 2 * a - b)
    torch.testing.assert_close(out.extras["latent-direction#1/raw"], b)


def test_placement_leaves_a_pinned_component_and_mixes_scores_on_the_batch_device(placed_reward):
    """``place`` (what trainers call with the accelerator's device) moves each component and the statistics,
    except a component whose args named a device; its scores are moved to the batch's device before mixing.
    ``meta`` stands in for a GPU: mixing it with CPU scores fails."""
    mix = rewards.build("weighted", components=[
        {"name": "test-placed", "args": {"value": 1.0}},
        {"name": "test-placed", "weight": 2.0, "args": {"value": 3.0, "device": "cpu"}, "normalize": "affine"}])
    free, pinned = mix.components
    assert (free.pinned_device, pinned.pinned_device) == (None, "cpu")
    assert mix.place("meta") is mix
    assert free.moves == [torch.device("meta")] and pinned.moves == []
    assert free.value.device.type == "meta" and pinned.value.device.type == "cpu"
    assert {b.device.type for b in mix.normalizers.buffers()} == {"meta"}
    out = mix(RewardInput(prompts=PROMPTS, latents=torch.zeros(4, 4, 2, 2, device="meta")))
    assert out.scores.device.type == "meta" and out.scores.shape == (4,)


def test_running_zscore_cumulative_equals_pooled_statistics():
    norm = ScoreNormalizer(NormalizeSpec(kind="zscore", eps=1e-6))
    g = torch.Generator().manual_seed(0)
    seen = []
    for size in (4, 1, 7, 3):
        x = torch.randn(size, generator=g, dtype=torch.float64) * 3 + 5
        seen.append(x)
        out = norm(x)
        pooled = torch.cat(seen)
        mean, std = pooled.mean(), pooled.std(unbiased=False)
        torch.testing.assert_close(out, (x - mean) / (std + 1e-6))
    assert int(norm.count) == 15


def test_running_zscore_ema_hand_worked():
    norm = ScoreNormalizer(NormalizeSpec(kind="zscore", momentum=0.5, eps=1e-6))
    norm(torch.tensor([1.0, 3.0]))  # first batch: mean 2, var 1
    out = norm(torch.tensor([5.0, 5.0]))  # mean 0.5*2 + 0.5*5 = 3.5, var 0.5*1 + 0.5*0 = 0.5
    assert norm.mean.item() == pytest.approx(3.5) and norm.var.item() == pytest.approx(0.5)
    torch.testing.assert_close(out, torch.full((2,), 1.5 / (0.5**0.5 + 1e-6)))
    assert "mean" in norm.state_dict() and "var" in norm.state_dict()  # checkpointed with the reward


def test_zscore_keeps_gradients():
    norm = ScoreNormalizer(NormalizeSpec(kind="zscore"))
    x = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    norm(x).sum().backward()
    std = torch.tensor([1.0, 2.0, 4.0]).std(unbiased=False)
    torch.testing.assert_close(x.grad, torch.full((3,), 1 / (std.item() + 1e-6)))


def test_zscore_only_centres_until_it_has_measured_a_spread():
    """ReFL scores one image per step: dividing its first score by ``std + eps`` with std 0 multiplied the
    gradient by 1e6."""
    norm = ScoreNormalizer(NormalizeSpec(kind="zscore", eps=1e-6))
    x = torch.tensor([3.0], requires_grad=True)
    out = norm(x)
    out.sum().backward()
    assert out.item() == 0.0 and x.grad.item() == 1.0
    second = norm(torch.tensor([5.0]))  # two scores seen: mean 4, std 1
    torch.testing.assert_close(second, torch.tensor([1.0 / (1.0 + 1e-6)]))
    flat = ScoreNormalizer(NormalizeSpec(kind="zscore", eps=1e-6))
    for _ in range(3):  # equal scores: no spread, centred only
        assert flat(torch.tensor([2.0, 2.0])).abs().max() == 0 and int(flat.count) >= 2


def test_evaluation_scores_leave_the_training_statistics_alone():
    from rlkit.evaluate import score_all

    toy = rewards.build("latent-direction", seed=1)
    mix = rewards.build("weighted", components=[{"name": "toy", "normalize": "zscore"}], rewards_by_key={"toy": toy})
    g = torch.Generator().manual_seed(0)
    train = torch.randn(4, 4, 2, 2, generator=g)
    mix(RewardInput(prompts=PROMPTS, latents=train))
    stats = {k: v.clone() for k, v in mix.state_dict().items()}
    held_out = torch.randn(4, 4, 2, 2, generator=g) * 5 + 3
    scored = score_all({"mix": mix}, PROMPTS, held_out, decode=None)["mix"]
    assert all(torch.equal(v, stats[k]) for k, v in mix.state_dict().items())
    assert not any(n.frozen for n in mix.normalizers)
    raw = toy(RewardInput(prompts=PROMPTS, latents=held_out)).scores.double()
    expected = (raw - stats["normalizers.0.mean"]) / (stats["normalizers.0.var"].sqrt() + 1e-6)
    torch.testing.assert_close(scored.double(), expected, rtol=1e-5, atol=1e-6)
    mix(RewardInput(prompts=PROMPTS, latents=held_out))  # a training call still updates them
    assert int(mix.normalizers[0].count) == 8


def test_held_out_total_normalises_the_zscored_components_by_the_given_reference():
    a, b = rewards.build("latent-direction", seed=1), rewards.build("latent-direction", seed=2)
    mix = rewards.build("weighted", components=[
        {"name": "a", "weight": 2.0, "normalize": "zscore"},
        {"name": "b", "weight": 0.5, "normalize": {"kind": "affine", "shift": 1.0, "scale": 4.0}}],
        rewards_by_key={"a": a, "b": b})
    assert mix.zscored == ["a"]
    scores = {"a/score": torch.tensor([1.0, 2.0, 4.0, 5.0]), "b/score": torch.tensor([3.0, -1.0, 7.0, 0.0])}
    reference = mix.held_out_reference(scores)
    assert reference == {"a": (pytest.approx(3.0), pytest.approx(2.5 ** 0.5))}  # population std
    total, normalized = mix.held_out_total(scores, {"a": (2.0, 0.5)})
    torch.testing.assert_close(normalized["a/normalized"], (scores["a/score"] - 2.0) / (0.5 + 1e-6))
    torch.testing.assert_close(normalized["b/normalized"], (scores["b/score"] + 1.0) / 4.0)
    torch.testing.assert_close(total, 2.0 * normalized["a/normalized"] + 0.5 * normalized["b/normalized"])
    centred, _ = mix.held_out_total(scores, {"a": (2.0, 0.0)})  # no spread: centred only, as in training
    torch.testing.assert_close(centred, 2.0 * (scores["a/score"] - 2.0) + 0.5 * normalized["b/normalized"])
    assert int(mix.normalizers[0].count) == 0  # the running statistics are not touched


def test_spec_errors_name_the_field():
    with pytest.raises(ValueError, match=r"components\[1\] has unknown keys \['wieght'\]"):
        rewards.build("weighted", components=[{"name": "latent-direction"}, {"name": "latent-direction", "wieght": 1}])
    with pytest.raises(ValueError, match=r"components\[0\]\.normalize.kind"):
        rewards.build("weighted", components=[{"name": "latent-direction", "normalize": "minmax"}])
    with pytest.raises(ValueError, match="at least one"):
        rewards.build("weighted", components=[])
    with pytest.raises(KeyError, match="unknown reward 'pickscor'"):
        rewards.build("weighted", components=[{"name": "pickscor"}])


def _zscore_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        norm = ScoreNormalizer(NormalizeSpec(kind="zscore", sync=True))
        x = torch.tensor([1.0, 2.0, 3.0]) if rank == 0 else torch.tensor([10.0, 20.0])
        queue.put((rank, norm(x).tolist(), norm.mean.item(), norm.var.item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_zscore_sync_pools_statistics_over_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_zscore_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (out, mean, var)) for r, out, mean, var in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    pooled = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0], dtype=torch.float64)
    mean, std = pooled.mean().item(), pooled.std(unbiased=False).item()
    for rank, x in ((0, [1.0, 2.0, 3.0]), (1, [10.0, 20.0])):
        out, m, v = results[rank]
        assert m == pytest.approx(mean) and v == pytest.approx(std**2)
        assert out == pytest.approx([(xi - mean) / (std + 1e-6) for xi in x], rel=1e-5)


def test_a_recipes_reward_list_normalises_each_component_as_it_says():
    """`rewards: [{name, weight, normalize}, ...]` is the weighted mixture with those normalisations; a bad one is
    refused at validation, and one on a golden reward, which is scored raw, is refused too."""
    from rlkit.config import ConfigError, recipe_from_dict
    from rlkit.trainers.common import build_reward

    base = {"algorithm": "flow_grpo"}
    recipe = recipe_from_dict({**base, "rewards": [
        {"name": "latent-direction", "args": {"seed": 1}, "normalize": "zscore"},
        {"name": "latent-direction", "args": {"seed": 2, "scale": 1000.0}, "weight": 0.5,
         "normalize": {"kind": "affine", "scale": 1000.0}}]})
    reward = build_reward(recipe.rewards)
    assert [n.spec.kind for n in reward.normalizers] == ["zscore", "affine"] and reward.weights == [1.0, 0.5]
    single = build_reward(recipe_from_dict({**base, "rewards": [{"name": "latent-direction", "normalize": "zscore"}]})
                          .rewards)
    assert [n.spec.kind for n in single.normalizers] == ["zscore"]  # a single reward, normalised: a mixture of one
    with pytest.raises(ConfigError, match=r"rewards\.0\.normalize: normalize\.kind must be one of"):
        recipe_from_dict({**base, "rewards": [{"name": "latent-direction", "normalize": "z-score"}]})
    with pytest.raises(ConfigError, match=r"eval\.golden\.0\.normalize: has no effect"):
        recipe_from_dict({**base, "rewards": [{"name": "latent-direction"}],
                          "eval": {"golden": [{"name": "latent-direction", "normalize": "zscore"}]}})
