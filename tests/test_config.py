from pathlib import Path

import pytest
import yaml

from rlkit.config import ConfigError, Recipe, load_recipe, recipe_from_dict, save_resolved
from rlkit.confload import package_path

RECIPES = sorted(p for p in Path(__file__).resolve().parents[1].joinpath("recipes").rglob("*.yaml")
                 if "accelerate" not in p.parts and "sweeps" not in p.parts)


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"algorithm": "refl", "rewards": [{"name": "latent-direction"}]}


def test_defaults_yaml_and_overrides_take_precedence_in_order(tmp_path):
    path = write(tmp_path, {**BASE, "optim": {"lr": 3e-4}, "refl": {"max_steps": 7}})
    r = load_recipe(path, ["optim.lr=1e-5", "rewards.0.weight=0.5", "rewards.0.args.scale=0.1", "launch.deepspeed=3"])
    assert r.optim.lr == 1e-5 and isinstance(r.optim.lr, float)
    assert r.refl.max_steps == 7  # YAML over default
    assert r.optim.weight_decay == 1e-4  # default
    assert r.rewards[0].weight == 0.5 and r.rewards[0].args == {"scale": 0.1}
    assert r.launch.deepspeed == 3
    assert r.refl.grad_step_range == (30, 39)
    # evaluation samples as the policy trains unless told otherwise
    assert r.eval.guidance_scale == r.refl.guidance_scale == 4.5
    assert recipe_from_dict({**BASE, "algorithm": "flow_grpo"}).eval.guidance_scale == 1.0
    assert recipe_from_dict(BASE, ["eval.guidance_scale=2.0"]).eval.guidance_scale == 2.0
    data = {**BASE, "optim": {"lr": 3e-4}}
    recipe_from_dict(data, ["optim.lr=1e-5"])
    assert data["optim"] == {"lr": 3e-4}  # the overrides edit a copy, not the caller's mapping


def test_all_mistakes_reported_at_once_with_file_and_key(tmp_path):
    path = write(tmp_path, {**BASE, "optim": {"lrr": 1e-4, "schedule": "cosin"}, "refl": {"max_steps": "ten"}})
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    problems = exc.value.problems
    assert len(problems) == 3
    text = str(exc.value)
    assert all(p.file == str(path) for p in problems)
    assert "optim.lrr: unknown key; did you mean 'lr'?" in text
    assert "optim.schedule" in text and "did you mean 'cosine'" in text
    assert "refl.max_steps: expected an integer, got 'ten'" in text


def test_value_rules_and_required_keys(tmp_path):
    with pytest.raises(ConfigError) as exc:
        recipe_from_dict({"refl": {"grad_step_range": [30, 45]}})
    text = str(exc.value)
    assert "algorithm: required key is missing" in text
    assert "refl.grad_step_range" in text
    with pytest.raises(ConfigError, match="needs at least one reward"):
        recipe_from_dict({"algorithm": "flow_grpo"})
    with pytest.raises(ConfigError, match=r"model\.text_cache_size: must be >= 0 .* got -1"):
        recipe_from_dict({**BASE, "model": {"text_cache_size": -1}})
    assert recipe_from_dict({**BASE, "model": {"text_cache_size": None}}).model.text_cache_size is None


def test_bad_override_path_is_reported(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match="no list item 3"):
        load_recipe(path, ["rewards.3.weight=1"])


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["seed=5"])
    out = save_resolved(r, tmp_path / "run")
    again = load_recipe(out)
    assert again == r and again.seed == 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert path.read_text().startswith("#"), "every recipe starts with a header comment"


def test_package_paths_resolve_to_the_installed_package(tmp_path):
    import rlkit

    r = recipe_from_dict({"algorithm": "refl", "model": {"pretrained": "pkg://rlkit/shapes/assets/generator"},
                          "rewards": [{"name": "dina-lrm", "args": {"pretrained": "pkg://rlkit/x", "u": 0.4}}]})
    root = Path(rlkit.__file__).parent
    assert r.model.pretrained == str(root / "shapes/assets/generator")
    assert r.rewards[0].args == {"pretrained": str(root / "x"), "u": 0.4}


def test_package_path_turns_paths_inside_the_package_back_into_pkg_names():
    import rlkit

    root = Path(rlkit.__file__).parent
    recipe = recipe_from_dict({"algorithm": "refl", "model": {"pretrained": "pkg://rlkit/shapes/assets/generator"},
                               "rewards": [{"name": "dina-lrm", "args": {"pretrained": "/elsewhere/dina"}}]})
    recorded = package_path(recipe.to_dict())
    assert recorded["model"]["pretrained"] == "pkg://rlkit/shapes/assets/generator"
    assert recorded["rewards"][0]["args"]["pretrained"] == "/elsewhere/dina"  # outside the package: unchanged
    assert package_path([str(root / "a" / "b.parquet"), "shapes:drawn:16", 3]) == [
        "pkg://rlkit/a/b.parquet", "shapes:drawn:16", 3]
    assert package_path(str(root.parent / "rlkitx" / "y")) == str(root.parent / "rlkitx" / "y")  # a sibling folder
