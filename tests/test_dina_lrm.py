"""DiNa-LRM reward: save/load, gradients, modes, backbone sharing; the latent-direction toy reward."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import rewards
from rewards.base import RewardInput
from rewards.dina_lrm import ADAPTER_NAME, DiNaLRMConfig, load_dina_lrm
from rewards.dina_lrm.reward import DiNaLRMReward
from rlkit.models.lora import active_adapters, add_lora, adapter_names, enable_adapter_aware_checkpointing
from rlkit.models.sd3 import SD3Generator, WeightsNotFoundError

PROMPTS = ["a red circle", "two blue squares"]
SEQ_LEN = 16


def tiny_config(**overrides) -> DiNaLRMConfig:
    fields = dict(num_transformer_layers=3, visual_head_idx=(1, 2, 3), text_head_idx=(2, 3), lora_r=4, lora_alpha=8,
                  lora_init="random", num_attn_heads=4, num_queries=2, max_sequence_length=SEQ_LEN)
    return DiNaLRMConfig(**{**fields, **overrides})


def randomize_head(reward: DiNaLRMReward, seed: int = 0) -> None:
    """Zero-initialised layers (FiLM, gates) random, so every part of the head matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reward.model.reward_head.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def latents_like(generator: SD3Generator, seed: int = 0) -> torch.Tensor:
    c, s, _ = generator.latent_shape(generator.vae_scale_factor * generator.transformer.config.sample_size)
    return torch.randn(len(PROMPTS), c, s, s, generator=torch.Generator().manual_seed(seed))


def batch(latents, seed=0, text=None, sigmas=None) -> RewardInput:
    return RewardInput(prompts=list(PROMPTS), latents=latents, text=text, sigmas=sigmas,
                       generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained_folder(tiny_sd3_dir, tmp_path_factory):
    """A DiNa-LRM checkpoint (random LoRA and head) on the tiny generator's base model. Read-only: copy it first
    to change it."""
    reward = DiNaLRMReward(config=tiny_config(), base_model=str(tiny_sd3_dir))
    reward.raw_scores(batch(torch.zeros(2, 4, 8, 8)))  # materialises the backbone
    randomize_head(reward)
    return reward.save_pretrained(tmp_path_factory.mktemp("dina") / "rm")


def policy_generator(tiny_sd3_dir) -> SD3Generator:
    gen = SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=SEQ_LEN)
    gen.transformer.requires_grad_(False)
    add_lora(gen.transformer, "policy", rank=4, alpha=8, init="random")
    return gen


def test_save_load_round_trip_is_identical(trained_folder, tiny_sd3_dir, tmp_path):
    a = rewards.build("dina-lrm", pretrained=str(trained_folder), base_model=str(tiny_sd3_dir))
    x = torch.randn(2, 4, 8, 8)
    first = a(batch(x, seed=3)).scores
    a.save_pretrained(tmp_path / "again")
    adapter = "checkpoint/backbone_lora/adapter_config.json"
    targets = json.loads((tmp_path / "again" / adapter).read_text())["target_modules"]
    assert targets == sorted(targets) and len(targets) > 1  # in one order, whatever the run's hash seed
    b = DiNaLRMReward(pretrained=str(tmp_path / "again"), base_model=str(tiny_sd3_dir))
    assert torch.equal(b(batch(x, seed=3)).scores, first)
    sa = {k: v for k, v in a.model.state_dict().items()}
    sb = b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(p.requires_grad for p in b.model.parameters())  # a loaded reward is frozen


@pytest.mark.parametrize("mode", ["renoise", "state", "ensemble"])
def test_modes_reproducible_and_differentiable(mode, trained_folder, tiny_sd3_dir):
    reward = DiNaLRMReward(pretrained=str(trained_folder), base_model=str(tiny_sd3_dir), mode=mode,
                           normalize="affine", shift=10.0, scale=10.0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    sigmas = torch.tensor([0.2, 0.6]) if mode == "state" else torch.zeros(2)  # the other modes read clean latents
    out = reward(batch(x, seed=1, sigmas=sigmas))
    assert out.scores.shape == (2,) and out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, (out.extras["raw"] + 10.0) / 10.0)
    out.scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        again = reward(batch(x, seed=1, sigmas=sigmas)).scores
        other_noise = reward(batch(x, seed=2, sigmas=sigmas)).scores
    assert torch.equal(again, out.scores.detach())
    if mode == "state":  # no noise drawn: the generator does not matter, sigma does
        assert torch.equal(other_noise, again)
        moved = reward(batch(x.detach(), sigmas=torch.tensor([0.5, 0.6]))).scores
        assert moved[0] != again[0] and moved[1] == again[1]
    else:  # a noisy state given to a mode that noises clean latents itself would be scored wrong, silently
        assert not torch.equal(other_noise, again)
        with pytest.raises(ValueError, match=rf"mode '{mode}' scores clean latents.*sigma up to 0.6.*mode: state"):
            reward(batch(x, seed=1, sigmas=torch.tensor([0.0, 0.6])))
    assert reward.scores_noisy_states == (mode == "state")


@pytest.mark.parametrize("mode", ["renoise", "ensemble"])
def test_one_generator_per_sample_makes_a_samples_noise_its_own(mode, trained_folder, tiny_sd3_dir):
    """With a generator per sample, a sample scores the same alone as in a batch (rlkit's evaluation seeds each slot);
    a wrong count is refused."""
    reward = DiNaLRMReward(pretrained=str(trained_folder), base_model=str(tiny_sd3_dir), mode=mode)
    x = torch.randn(2, 4, 8, 8)

    def generators(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    with torch.no_grad():
        both = reward(RewardInput(prompts=list(PROMPTS), latents=x, generator=generators([5, 6]))).scores
        second = reward(RewardInput(prompts=list(PROMPTS[1:]), latents=x[1:], generator=generators([6]))).scores
        swapped = reward(RewardInput(prompts=list(PROMPTS), latents=x, generator=generators([6, 5]))).scores
    torch.testing.assert_close(second, both[1:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(swapped, both, rtol=1e-3, atol=1e-4)  # the noise is the generators', not the batch's
    with pytest.raises(ValueError, match="holds 1 generators for 2 samples"):
        reward(RewardInput(prompts=list(PROMPTS), latents=x, generator=generators([5])))


def test_noise_needs_an_explicit_generator(trained_folder, tiny_sd3_dir):
    reward = DiNaLRMReward(pretrained=str(trained_folder), base_model=str(tiny_sd3_dir))
    with pytest.raises(ValueError, match="generator"):
        reward(RewardInput(prompts=list(PROMPTS), latents=torch.zeros(2, 4, 8, 8)))


def test_own_text_encoders_equal_generator_text(trained_folder, tiny_sd3_dir):
    reward = DiNaLRMReward(pretrained=str(trained_folder), base_model=str(tiny_sd3_dir))
    text = SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=SEQ_LEN).encode_prompts(PROMPTS)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(reward(batch(x, text=text)).scores, reward(batch(x)).scores)


def test_sharing_adds_only_lora_and_head(trained_folder, tiny_sd3_dir):
    gen = policy_generator(tiny_sd3_dir)
    before = {n: p for n, p in gen.transformer.named_parameters()}
    reward = DiNaLRMReward(pretrained=str(trained_folder), base_model=str(tiny_sd3_dir))
    reward.attach_generator(gen)
    assert reward.is_shared
    after = dict(gen.transformer.named_parameters())
    new = {n for n in after if n not in before and not n.replace(".base_layer", "") in before}
    assert new and all(f".{ADAPTER_NAME}." in n for n in new)
    lora = sum(after[n].numel() for n in new)
    head = sum(p.numel() for p in reward.parameters())  # the generator's weights are not the reward's
    assert head == sum(p.numel() for p in reward.model.reward_head.parameters())
    assert sum(p.numel() for p in reward.model.added_parameters()) == lora + head
    standalone = DiNaLRMReward(pretrained=str(trained_folder), base_model=str(tiny_sd3_dir))
    standalone._materialize()
    assert lora == sum(p.numel() for p in standalone.model.lora_parameters())
    assert sum(p.numel() for p in standalone.model.parameters()) > lora + head  # it carries backbone weights
    assert active_adapters(gen.transformer) == ["policy"]  # the generator still runs its own adapter
    assert adapter_names(gen.transformer) == {"policy", ADAPTER_NAME}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_reward_gradients_equal_a_separate_frozen_copy(checkpointing, trained_folder, tiny_sd3_dir,
                                                              checkpoint_calls):
    """ReFL: policy -> x0_hat -> reward. Sharing the blocks gives the policy the same gradients as a copy,
    also when the generator checkpoints its blocks (re-runs at backward time use the forward's adapter)."""
    gen = policy_generator(tiny_sd3_dir)
    if checkpointing:
        enable_adapter_aware_checkpointing(gen.transformer)
    base_copy = copy.deepcopy(SD3Generator.from_pretrained(tiny_sd3_dir).transformer).requires_grad_(False)
    shared = DiNaLRMReward(pretrained=str(trained_folder), base_model=str(tiny_sd3_dir))
    shared.attach_generator(gen)
    separate = DiNaLRMReward(pretrained=str(trained_folder), share_backbone="never")
    separate.model = load_dina_lrm(trained_folder, base_copy)
    assert shared.is_shared and not separate.is_shared
    text = gen.encode_prompts(PROMPTS)
    x = latents_like(gen, seed=4)
    sigma = torch.tensor([0.7, 0.7])
    policy_params = [p for n, p in gen.transformer.named_parameters() if ".policy." in n]
    assert policy_params and all(p.requires_grad for p in policy_params)

    def policy_grads(reward):
        v = gen.velocity(x, sigma, text)
        x0_hat = x - sigma[:, None, None, None] * v
        scores = reward(batch(x0_hat, seed=9, text=text)).scores
        grads = torch.autograd.grad(scores.sum(), policy_params)
        return scores.detach(), grads

    s_shared, g_shared = policy_grads(shared)
    # the policy's blocks, then the reward's (the first of them, run under rm_lora) are checkpointed
    blocks = len(gen.transformer.transformer_blocks) + shared.model.config.num_transformer_layers
    assert len(checkpoint_calls) == (blocks if checkpointing else 0)
    s_sep, g_sep = policy_grads(separate)
    torch.testing.assert_close(s_shared, s_sep, rtol=0, atol=1e-5)
    assert sum(g.abs().sum() for g in g_shared) > 0
    for a, b in zip(g_shared, g_sep):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert active_adapters(gen.transformer) == ["policy"]
    assert all(p.requires_grad for p in policy_params)
    assert not any(p.requires_grad for p in shared.model.lora_parameters())


def test_adding_the_reward_leaves_the_policy_output_unchanged(trained_folder, tiny_sd3_dir):
    gen = policy_generator(tiny_sd3_dir)
    text = gen.encode_prompts(PROMPTS)
    x, sigma = latents_like(gen, seed=5), torch.tensor([0.5, 0.9])
    with torch.no_grad():
        before = gen.velocity(x, sigma, text)
        reward = DiNaLRMReward(pretrained=str(trained_folder))
        reward.attach_generator(gen)
        reward(batch(x, text=text))
        torch.testing.assert_close(gen.velocity(x, sigma, text), before, rtol=0, atol=0)


def test_fully_finetuned_generator_refused_or_copied(trained_folder, tiny_sd3_dir):
    gen = SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=SEQ_LEN)  # base weights require grad
    with pytest.raises(ValueError, match="fully fine-tuned"):
        DiNaLRMReward(pretrained=str(trained_folder)).attach_generator(gen)
    reward = DiNaLRMReward(pretrained=str(trained_folder), on_full_finetune="copy")
    reward.attach_generator(gen)
    assert not reward.is_shared and ADAPTER_NAME not in adapter_names(gen.transformer)
    assert not any(p.requires_grad for p in reward.model.parameters())
    block = reward.model.backbone.transformer_blocks[0]
    assert block is not gen.transformer.transformer_blocks[0]


def test_full_model_checkpoint_copies_the_blocks_without_the_policy_adapter(tiny_sd3_dir, tmp_path):
    source = DiNaLRMReward(config=tiny_config(use_lora=False), base_model=str(tiny_sd3_dir))
    x = torch.randn(2, 4, 8, 8)
    expected = source(batch(x, seed=2)).scores
    source.save_pretrained(tmp_path / "full")
    gen = policy_generator(tiny_sd3_dir)
    reward = DiNaLRMReward(pretrained=str(tmp_path / "full"))
    reward.attach_generator(gen)  # full_model.pt holds its own backbone: a copy, never the policy's LoRA
    assert not reward.is_shared and adapter_names(reward.model.backbone) == set()
    torch.testing.assert_close(reward(batch(x, seed=2)).scores, expected)


def test_different_base_model_is_not_shared(trained_folder, tiny_sd3_dir, tmp_path):
    gen = policy_generator(tiny_sd3_dir)
    reward = DiNaLRMReward(pretrained=str(trained_folder), base_model=str(tmp_path / "elsewhere"))
    reward.attach_generator(gen)
    assert not reward.is_shared and ADAPTER_NAME not in adapter_names(gen.transformer)


def test_an_own_copy_of_the_blocks_loads_in_the_attached_generators_dtype(trained_folder, tiny_sd3_dir):
    """Unless its args say otherwise: a bf16 policy's separate reward copy is not loaded at twice its size."""
    gen = SD3Generator.from_pretrained(tiny_sd3_dir, dtype="bf16", max_sequence_length=SEQ_LEN)
    for dtype, expected in ((None, torch.bfloat16), ("fp32", torch.float32)):
        reward = DiNaLRMReward(pretrained=str(trained_folder), base_model=str(tiny_sd3_dir), share_backbone="never",
                               **({"dtype": dtype} if dtype else {}))
        reward.attach_generator(gen)
        model = reward._materialize()
        assert not reward.is_shared
        assert next(model.tapped_backbone.transformer_blocks.parameters()).dtype == expected
    alone = DiNaLRMReward(pretrained=str(trained_folder), base_model=str(tiny_sd3_dir))._materialize()
    assert next(alone.tapped_backbone.transformer_blocks.parameters()).dtype == torch.float32  # no generator


def test_fresh_model_for_reward_training(tiny_sd3_dir):
    reward = DiNaLRMReward(config=tiny_config(lora_init="gaussian"), base_model=str(tiny_sd3_dir))
    model = reward._materialize()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or not n.startswith("backbone.") for n in trainable)
    x = torch.randn(2, 4, 8, 8)
    scores = reward(batch(x)).scores
    scores.sum().backward()
    assert all(p.grad is not None for p in model.reward_head.parameters() if p.requires_grad)
    params = reward.set_trainable("head")
    assert {id(p) for p in params} == {id(p) for p in model.reward_head.parameters()}
    assert not any(p.requires_grad for p in model.lora_parameters())
    assert len(reward.set_trainable("lora_head")) == len(params) + len(model.lora_parameters())
    with pytest.raises(ValueError, match="saves in mode 'lora'"):  # the trained base weights would not be saved
        reward.set_trainable("full")
    assert reward.set_trainable("none") == []
    full = DiNaLRMReward(config=tiny_config(use_lora=False), base_model=str(tiny_sd3_dir))
    assert len(full.set_trainable("full")) == len(list(full.model.parameters()))


@pytest.mark.parametrize("use_lora", [True, False])
def test_trained_logistic_output_survives_save_and_load(use_lora, tiny_sd3_dir, tmp_path):
    """The release saves eta3, eta4 only inside full_model.pt; beside a LoRA or a head rlkit writes them too."""
    config = tiny_config(use_logistic=True, use_lora=use_lora, freeze_backbone=not use_lora)
    reward = DiNaLRMReward(config=config, base_model=str(tiny_sd3_dir))
    reward._materialize()
    randomize_head(reward)
    with torch.no_grad():
        reward.model.eta3.fill_(1.5)
        reward.model.eta4.fill_(0.7)
    x = torch.randn(2, 4, 8, 8)
    before = reward(batch(x, seed=1)).scores.detach()
    folder = reward.save_pretrained(tmp_path / "rm")
    loaded = DiNaLRMReward(pretrained=str(folder), base_model=str(tiny_sd3_dir))
    # (a built and a loaded model differ by float rounding, ~1e-7; initial etas would move the scores by ~1)
    torch.testing.assert_close(loaded(batch(x, seed=1)).scores, before, rtol=1e-5, atol=1e-5)
    assert (loaded.model.eta3.item(), loaded.model.eta4.item()) == (1.5, pytest.approx(0.7))
    (folder / "checkpoint" / "logistic.pt").unlink()  # a release checkpoint: initial values, and a warning
    with pytest.warns(UserWarning, match="logistic.pt is missing"):
        bare = DiNaLRMReward(pretrained=str(folder), base_model=str(tiny_sd3_dir))._materialize()
    assert (bare.eta3.item(), bare.eta4.item()) == (0.0, pytest.approx(0.15))


def test_sigma_table_stays_float32_in_a_bf16_model(tiny_sd3_dir):
    """Snapping in a bf16 model must land on the release's float32 table, not on bf16 roundings of it."""
    reward = DiNaLRMReward(config=tiny_config(), base_model=str(tiny_sd3_dir))
    model = reward._materialize()
    levels = torch.tensor([0.1, 0.4, 0.7])
    reference = model.snap(levels)
    model.to(torch.bfloat16)
    assert model.grid.dtype == torch.float32 and next(model.reward_head.parameters()).dtype == torch.bfloat16
    assert torch.equal(model.snap(levels), reference)
    assert model.grid.unique().numel() == model.config.grid_num_train_timesteps


def test_to_before_materialisation_is_where_and_how_the_own_backbone_loads(trained_folder, tiny_sd3_dir):
    """The reward loads its backbone at first use; a ``.to()`` before that moves an empty module, so it must be
    remembered (else the backbone loads on the options' device while the trainer's data is elsewhere)."""
    reward = DiNaLRMReward(pretrained=str(trained_folder), base_model=str(tiny_sd3_dir)).to(torch.float64)
    assert reward.model is None
    x = torch.randn(2, 4, 8, 8)
    scores = reward(batch(x)).scores
    # (peft keeps the LoRA weights in float32, as it does for an options dtype)
    assert {p.dtype for n, p in reward.model.named_parameters() if ".lora_" not in n} == {torch.float64}
    assert scores.dtype == torch.float32 and scores.device == x.device


def test_placement_is_remembered_unless_args_pin_a_device_or_the_policy_owns_the_blocks(
        trained_folder, tiny_sd3_dir, monkeypatch):
    gen = policy_generator(tiny_sd3_dir)
    shared = DiNaLRMReward(pretrained=str(trained_folder), base_model=str(tiny_sd3_dir))
    shared.attach_generator(gen)
    shared.place("meta")  # a device the policy is not on: the shared reward stays with the policy
    assert shared.is_shared and shared.device == torch.device("cpu")
    assert all(t.device.type == "cpu" for t in [*shared.parameters(), *shared.buffers()])

    loads = []

    def record(source, **kwargs):
        loads.append(kwargs["device"])
        raise RuntimeError("load recorded")

    monkeypatch.setattr(SD3Generator, "from_pretrained", record)
    for args, expected in (({}, "meta"), ({"device": "cpu"}, "cpu")):
        reward = rewards.build("dina-lrm", pretrained=str(trained_folder), base_model=str(tiny_sd3_dir), **args)
        reward.place("meta")  # what the trainers do with the accelerator's device
        assert reward.device == torch.device(expected)
        with pytest.raises(RuntimeError, match="load recorded"):
            reward(batch(torch.zeros(2, 4, 8, 8)))
    assert loads == [torch.device("meta"), torch.device("cpu")]


def test_missing_files_are_named(tmp_path, trained_folder, tiny_sd3_dir):
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        DiNaLRMReward(pretrained=str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="nobody/no-such-reward"):
        DiNaLRMReward(pretrained="nobody/no-such-reward")
    broken = shutil.copytree(trained_folder, tmp_path / "broken")
    (broken / "checkpoint" / "rm_head.pt").unlink()
    reward = DiNaLRMReward(pretrained=str(broken), base_model=str(tiny_sd3_dir))
    with pytest.raises(WeightsNotFoundError, match=r"rm_head\.pt.*hf download"):
        reward(batch(torch.zeros(2, 4, 8, 8)))


@pytest.mark.parametrize("name", ["config.json", "checkpoint/backbone_lora/adapter_config.json",
                                  "checkpoint/backbone_lora/adapter_model.safetensors", "checkpoint/rm_head.pt"])
@pytest.mark.parametrize("cut", ["half", "empty"])
def test_a_file_cut_short_is_named_as_corrupt(tmp_path, trained_folder, tiny_sd3_dir, name, cut):
    """Not the JSON, zip, pickle or safetensors reader's own message, which names no file."""
    broken = shutil.copytree(trained_folder, tmp_path / "broken")
    data = (broken / name).read_bytes()
    (broken / name).write_bytes(data[: len(data) // 2] if cut == "half" else b"")
    with pytest.raises(ValueError, match=rf"checkpoint file '.*broken/{name}' .* cannot be read, so it is corrupt or "
                                         r"cut short: \w+"):
        reward = DiNaLRMReward(pretrained=str(broken), base_model=str(tiny_sd3_dir))
        reward(batch(torch.zeros(2, 4, 8, 8)))


def test_options_are_validated():
    with pytest.raises(ValueError, match="'mode'"):
        DiNaLRMReward(config=tiny_config(), mode="sometimes")
    with pytest.raises(TypeError, match="unknown option"):
        DiNaLRMReward(config=tiny_config(), temperature=2.0)
    with pytest.raises(ValueError, match="num_transformer_layers"):
        DiNaLRMConfig(num_transformer_layers=3, visual_head_idx=(4,))


def test_latent_direction_toy_reward():
    reward = rewards.build("latent-direction", seed=3)
    assert reward.space == "latent" and reward.noise_aware and reward.differentiable
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = reward(RewardInput(prompts=["a", "b"], latents=x0))
    d = reward.direction((4, 8, 8))
    torch.testing.assert_close(out.scores, (x0 * d).flatten(1).sum(1) / d.numel())
    out.scores.sum().backward()
    torch.testing.assert_close(x0.grad[0], d / d.numel())
    sigmas = torch.tensor([0.5, 0.5])
    noisy = RewardInput(prompts=["a", "b"], latents=(0.5 * x0).detach(), sigmas=sigmas)
    torch.testing.assert_close(reward(noisy).scores, out.scores.detach())  # unbiased at its own sigma
    assert torch.equal(rewards.build("latent-direction", seed=3).direction((4, 8, 8)), d)
