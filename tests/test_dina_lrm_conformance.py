"""Conformance of ``rewards.dina_lrm`` with the official DiNa-LRM code, through an independent reference.

``tests/reference/official_dina_lrm.py`` mirrors the release's module tree, parameter names and maths;
``tests/fixtures/dina_lrm/`` holds a tiny checkpoint it wrote in the release's layout with its outputs
(regenerate with ``python -m tests.reference.make_dina_lrm_fixture``).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rewards.base import RewardInput, TextConditioning
from rewards.dina_lrm import DiNaLRM, DiNaLRMConfig, load_dina_lrm, save_dina_lrm
from rewards.dina_lrm.head import RewardHead
from rewards.dina_lrm.model import sigma_grid
from rewards.dina_lrm.reward import DiNaLRMReward

from reference import official_dina_lrm as ref

FIXTURE = Path(__file__).parent / "fixtures" / "dina_lrm"
TOL = 1e-5
SD35M_WIDTH = 1536
SD35M_HEAD_PARAMS_M = 139  # the paper's "about 139 M" head parameters


def base_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(FIXTURE / "base_transformer").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def io():
    return torch.load(FIXTURE / "io.pt", weights_only=True)


def text_of(io) -> TextConditioning:
    return TextConditioning(io["encoder_hidden_states"], io["pooled_projections"])


def reference_from(folder: Path):
    """The reference model loaded from ``folder`` the official way (``DRMInferencer.load_checkpoint``)."""
    import json

    cfg = ref.to_namespace(json.loads((folder / "config.json").read_text())["model"])
    return ref.load_checkpoint(ref.SD3RewardModel(base_transformer(), cfg), cfg, str(folder / "checkpoint"))


def test_fixture_is_small_and_complete():
    files = [p for p in FIXTURE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2 * 1024 * 1024
    for name in ("rm/config.json", "rm/checkpoint/rm_head.pt", "rm/checkpoint/backbone_lora/adapter_config.json",
                 "rm/checkpoint/backbone_lora/adapter_model.safetensors", "io.pt"):
        assert (FIXTURE / name).is_file(), name


@torch.no_grad()
def test_fixture_forward_and_ensemble_match_reference(io):
    model = load_dina_lrm(FIXTURE / "rm", base_transformer())
    text = text_of(io)
    torch.testing.assert_close(model(io["latents"], io["timesteps"], text), io["expected"]["forward"],
                               rtol=0, atol=TOL)
    u = model.snap(io["renoise_u"])
    noisy = (1 - u) * io["latents"] + u * io["noise"]
    torch.testing.assert_close(model.score(noisy, u, text), io["expected"]["reward_u"], rtol=0, atol=TOL)
    levels = model.snap(io["levels"])
    torch.testing.assert_close(model.score_ensemble(io["latents"], io["noise"], levels, text),
                               io["expected"]["ensemble"], rtol=0, atol=TOL)
    # the three expected values differ from each other by far more than the tolerance: the test can fail
    assert (io["expected"]["forward"] - io["expected"]["ensemble"]).abs().min() > 100 * TOL


def test_sigma_grid_is_the_scheduler_table():
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.testing.assert_close(sigma_grid(1000, 3.0), FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.float())


def test_head_keys_equal_release_at_sd35m_shapes():
    with torch.device("meta"):
        ours = RewardHead(token_dim=SD35M_WIDTH, cond_dim=SD35M_WIDTH, width=SD35M_WIDTH, n_visual=3, n_text=3)
        theirs = ref.RewardHead(token_dim=SD35M_WIDTH, width=-1, n_visual_heads=3, n_text_heads=3,
                                t_embed_dim=SD35M_WIDTH)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes
    n_params = sum(p.numel() for p in ours.parameters())
    assert round(n_params / 1e6) == SD35M_HEAD_PARAMS_M


@torch.no_grad()
def test_reward_modes_match_reference(io):
    """The registered reward (renoise / ensemble / state) against the official inference path, same noise."""
    reference = reference_from(FIXTURE / "rm")
    scheduler = __import__("diffusers").FlowMatchEulerDiscreteScheduler(shift=3.0)
    transformer = base_transformer()
    reward = DiNaLRMReward(pretrained=str(FIXTURE / "rm"), mode="renoise", u=0.4)
    reward.attach_generator(SimpleNamespace(transformer=transformer, pipeline=SimpleNamespace(text_encoder=None)))
    assert reward.is_shared
    text = text_of(io)
    conds = {"encoder_hidden_states": text.encoder_hidden_states, "pooled_projections": text.pooled_projections}
    latents = io["latents"]

    def batch(seed: int, sigmas=None) -> RewardInput:
        return RewardInput(prompts=["p"] * len(latents), latents=latents, text=text, sigmas=sigmas,
                           generator=torch.Generator().manual_seed(seed))

    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    expected = ref.reward(reference, scheduler, conds, latents, 0.4, noise)[:, 0]
    torch.testing.assert_close(reward(batch(5)).scores, expected, rtol=0, atol=TOL)

    reward.options.mode = "ensemble"
    expected = ref.reward_ensemble(reference, scheduler, conds, latents, (0.2, 0.5, 0.7), noise)[:, 0]
    torch.testing.assert_close(reward(batch(5)).scores, expected, rtol=0, atol=TOL)

    reward.options.mode = "state"
    sigmas = torch.tensor([0.3, 0.8])
    expected = reference(latents=latents, timesteps=1000 * sigmas, **conds)[:, 0]
    torch.testing.assert_close(reward(batch(0, sigmas)).scores, expected, rtol=0, atol=TOL)


def _reference_model(config: dict, seed: int, randomize_backbone: bool):
    model = ref.SD3RewardModel(base_transformer(), ref.to_namespace(config["model"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref.randomize_(model.reward_head, g)
        for name, p in model.named_parameters():
            if "lora_" in name or (randomize_backbone and name.startswith("backbone.")) or name.startswith("eta"):
                fan_in = p.shape[-1] if p.dim() else 1
                offset = 1.0 if name.startswith("eta") else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 / fan_in ** 0.5 + offset)
    return model.eval()


SAVE_MODES = {
    # release mode, taps, and what it exercises
    "lora_excluded_last_block": dict(use_lora=True, freeze_backbone=False, visual=(0, 2, 3), text=(1, 2)),
    "full_model_with_logistic": dict(use_lora=False, freeze_backbone=False, visual=(1, 3), text=(3,),
                                     use_logistic=True),
    "head_only": dict(use_lora=False, freeze_backbone=True, visual=(2,), text=(1, 2, 3)),
}


@pytest.mark.parametrize("case", sorted(SAVE_MODES))
@torch.no_grad()
def test_other_release_layouts_load(case, io, tmp_path):
    spec = SAVE_MODES[case]
    config = ref.official_config(3, spec["visual"], spec["text"], use_lora=spec["use_lora"],
                                 freeze_backbone=spec["freeze_backbone"], use_logistic=spec.get("use_logistic", False),
                                 num_queries=3, num_attn_heads=4)
    full = not spec["use_lora"] and not spec["freeze_backbone"]  # only full_model.pt carries backbone weights
    reference = _reference_model(config, seed=7, randomize_backbone=full)
    ref.save_checkpoint(reference, config, str(tmp_path))
    model = load_dina_lrm(tmp_path, base_transformer())
    text = text_of(io)
    conds = {"encoder_hidden_states": text.encoder_hidden_states, "pooled_projections": text.pooled_projections}
    expected = reference(latents=io["latents"], timesteps=io["timesteps"], **conds)[:, 0]
    torch.testing.assert_close(model(io["latents"], io["timesteps"], text), expected, rtol=0, atol=TOL)
    xs = [io["latents"], io["noise"]]
    ts = [io["timesteps"], io["timesteps"].flip(0)]
    expected = reference.forward_ensemble(latents=xs, ensemble_timesteps=ts, **conds)[:, 0]
    torch.testing.assert_close(model.forward_ensemble(xs, ts, text), expected, rtol=0, atol=TOL)


OUR_SAVE_MODES = {"lora": dict(use_lora=True, freeze_backbone=False),
                  "full": dict(use_lora=False, freeze_backbone=False, use_logistic=True),
                  "head": dict(use_lora=False, freeze_backbone=True)}


@pytest.mark.parametrize("mode", sorted(OUR_SAVE_MODES))
@torch.no_grad()
def test_our_checkpoint_loads_in_the_official_path(mode, io, tmp_path):
    """What we save (release layout, each save mode) is read by the official loader and scores identically;
    it also loads back into our model unchanged."""
    config = DiNaLRMConfig(num_transformer_layers=3, visual_head_idx=(1, 2, 3), text_head_idx=(2, 3), lora_r=4,
                           lora_alpha=8, lora_init="random", num_attn_heads=4, num_queries=2,
                           **OUR_SAVE_MODES[mode])
    model = DiNaLRM.build(config, base_transformer())
    assert model.config.save_mode == mode
    g = torch.Generator().manual_seed(3)
    ref.randomize_(model.reward_head, g)
    if mode == "full":
        ref.randomize_(model.backbone, g, scale=1.0)
    save_dina_lrm(model, tmp_path)
    ours = load_dina_lrm(tmp_path, base_transformer())
    assert ours.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ours.state_dict().items())
    reference = reference_from(tmp_path)
    text = text_of(io)
    conds = {"encoder_hidden_states": text.encoder_hidden_states, "pooled_projections": text.pooled_projections}
    expected = reference(latents=io["latents"], timesteps=io["timesteps"], **conds)[:, 0]
    torch.testing.assert_close(model(io["latents"], io["timesteps"], text), expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("mode", sorted(OUR_SAVE_MODES))
@torch.no_grad()
def test_weights_given_by_name_are_saved_instead_of_the_modules_rounded_copies(mode, tmp_path):
    """A bf16 DeepSpeed run's module holds bf16 copies of its fp32 masters; the trainer saves the masters."""
    config = DiNaLRMConfig(num_transformer_layers=3, visual_head_idx=(1, 2, 3), text_head_idx=(2, 3), lora_r=4,
                           lora_alpha=8, lora_init="random", num_attn_heads=4, num_queries=2,
                           **OUR_SAVE_MODES[mode])
    model = DiNaLRM.build(config, base_transformer())
    g = torch.Generator().manual_seed(5)
    masters = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("reward_head.") for n in masters)
    assert any(not torch.equal(v, v.bfloat16().float()) for v in masters.values())  # what rounding would lose
    model.to(torch.bfloat16)
    save_dina_lrm(model, tmp_path, weights=masters)
    saved = load_dina_lrm(tmp_path, base_transformer()).state_dict()
    assert all(torch.equal(saved[n], v) for n, v in masters.items())
    with pytest.raises(KeyError, match="reward_head.nope"):
        save_dina_lrm(model, tmp_path / "bad", weights={"reward_head.nope": torch.zeros(1)})


def test_release_config_json_gives_the_default_config():
    """The release's config.json (12 blocks, taps 4/8/12, r 64 / alpha 128, 4 queries, 8 heads) is the default."""
    release = ref.official_config(12, (4, 8, 12), (4, 8, 12), r=64, alpha=128)
    parsed = DiNaLRMConfig.from_official(release)
    default = DiNaLRMConfig()
    for name in ("num_transformer_layers", "visual_head_idx", "text_head_idx", "lora_r", "lora_alpha", "lora_init",
                 "num_queries", "num_attn_heads", "head_width", "use_lora", "freeze_backbone", "add_noise"):
        assert getattr(parsed, name) == getattr(default, name), name
    assert parsed.excluded_lora_modules == ()
    again = DiNaLRMConfig.from_official(parsed.to_official())
    assert again == parsed
