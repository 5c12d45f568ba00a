"""The reward registry: lazy built-ins, decorator registration, entry points, dotted paths, clear errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import rewards
from rewards import Registry, Reward, RewardInput, RewardOutput


def test_importing_rewards_loads_no_model_code():
    code = ("import sys, rewards; heavy = [m for m in ('diffusers', 'transformers', 'peft', 'rewards.dina_lrm', "
            "'rewards.pickscore', 'rewards.hpsv3') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_builtins_are_listed_and_built_by_name():
    names = rewards.available()
    for name in ("dina-lrm", "pickscore", "hpsv3", "weighted", "latent-direction", "shapes-golden"):
        assert name in names
    reward = rewards.build("latent-direction", seed=3)
    out = reward(RewardInput(prompts=["a", "b"], latents=torch.randn(2, 4, 8, 8)))
    assert out.scores.shape == (2,)


def test_unknown_name_fails_with_the_known_names_and_a_suggestion():
    with pytest.raises(KeyError) as exc:
        rewards.build("dina-lmr")
    text = str(exc.value)
    assert "did you mean 'dina-lrm'" in text.lower() and "pickscore" in text


def test_args_that_do_not_fit_name_the_reward_and_what_it_takes():
    # a YAML flow mapping written without its space, `{seed:3}`, reads as one key
    with pytest.raises(TypeError, match=r"reward 'latent-direction'.*\['seed:3'\].*it takes: seed, scale"):
        rewards.build("latent-direction", **{"seed:3": None})
    with pytest.raises(TypeError, match="it takes: seed, scale"):
        rewards.build("latent-direction", sed=3)


@pytest.mark.parametrize("name, good, bad, hint", [
    ("hpsv3", {"dtype": "bf16", "gradient_checkpointing": True}, "differentiable", None),
    ("pickscore", {"normalize": "affine", "scale": 26.0}, "scal", "scale"),
    ("dina-lrm", {"pretrained": "x", "mode": "state"}, "mdoe", "mode"),
])
def test_args_of_a_reward_taking_kwargs_are_checked_against_its_args_class(name, good, bad, hint):
    """Before any model loads, in ``rewards.build`` and in recipe validation (the check imports no weights)."""
    from rlkit.config import ConfigError, recipe_from_dict

    assert rewards.REGISTRY.check_args(name, good) is rewards.resolve(name)
    message = rf"reward '{name}': unknown args '{bad}'" + (rf" \(did you mean '{hint}'\?\)" if hint else "")
    with pytest.raises(TypeError, match=message + ".*it takes: .*dtype"):
        rewards.build(name, **good, **{bad: 1})
    with pytest.raises(ConfigError, match=r"rewards\.0\.args: " + message):
        recipe_from_dict({"algorithm": "refl", "rewards": [{"name": name, "args": {**good, bad: 1}}]})


def test_decorator_and_dotted_path():
    registry = Registry()

    @registry.register("const")
    class Const(Reward):
        space = "latent"

        def __init__(self, value: float = 1.0):
            super().__init__()
            self.value = value

        def forward(self, batch: RewardInput) -> RewardOutput:
            return RewardOutput(scores=torch.full((batch.batch_size,), self.value))

    assert "const" in registry.available() and registry.resolve("const") is Const  # beside installed plugins
    assert registry.build("const", value=2.0)(RewardInput(prompts=["x"])).scores.tolist() == [2.0]
    dotted = registry.build("rewards.toy:LatentDirectionReward", seed=1)
    assert type(dotted).__name__ == "LatentDirectionReward"
    with pytest.raises(KeyError, match="cannot be imported"):
        registry.build("no.such.module:Thing")


def test_third_party_reward_plugs_in_through_the_entry_point_group(tmp_path):
    pkg = tmp_path / "myreward"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import torch
        from rewards import Reward, RewardOutput

        class Brightness(Reward):
            space = "pixel"
            def forward(self, batch):
                return RewardOutput(scores=batch.pixels().mean(dim=(1, 2, 3)))
    """))
    dist = tmp_path / "myreward-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myreward\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlkit.rewards]\nbrightness = myreward:Brightness\n")
    code = textwrap.dedent("""
        import torch, rewards
        from rewards import RewardInput
        r = rewards.build("brightness")
        print("brightness" in rewards.available(),
              r(RewardInput(prompts=["a"], images=torch.ones(1, 3, 4, 4))).scores.item())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": f"{tmp_path}:{sys.path[0] if sys.path[0] else '.'}", "PATH": ""},
                         cwd=str(tmp_path.parent)).stdout
    assert out.split() == ["True", "1.0"]
