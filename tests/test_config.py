import re
from pathlib import Path

import pytest
import yaml

from rlkit.config import ConfigError, Recipe, load_recipe, recipe_from_dict, save_resolved
from rlkit.confload import package_path, resolve_package_path

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


def test_values_that_crashed_validation_are_reported_by_key(tmp_path):
    """Wrong-length pairs, zero divisors, YAML's booleans for 'no', NaN and prompt sources that cannot load."""
    path = write(tmp_path, {**BASE, "algorithm": "flow_grpo"})
    with pytest.raises(ConfigError) as exc:
        load_recipe(path, ["refl.grad_step_range=[1, 2, 3]", "flow_grpo.window_start_range=[1]",
                           "optim.lr=.nan", "prompts.limit=0",
                           "prompts.source=shapes:bogus", f"eval.prompts={tmp_path / 'missing.txt'}"])
    text = str(exc.value)
    assert "refl.grad_step_range: expected a list of 2 items, got [1, 2, 3]" in text
    assert "flow_grpo.window_start_range: expected a list of 2 items, got [1]" in text
    assert "optim.lr: must be > 0, got nan" in text
    assert "prompts.limit: must be > 0, got 0" in text
    assert "prompts.source: prompt source 'shapes:bogus': the Shapes world has the splits train, heldout" in text
    assert "eval.prompts: prompt source" in text and "missing.txt': no such file" in text
    with pytest.raises(ConfigError, match="flow_grpo.updates_per_epoch: must be > 0, got 0"):
        load_recipe(path, ["flow_grpo.updates_per_epoch=0"])  # (not a division by zero in the epoch checks)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match=r"prompts\.source: prompt source .*empty\.txt' holds no prompts"):
        load_recipe(path, [f"prompts.source={tmp_path / 'empty.txt'}"])
    assert load_recipe(path, ["launch.mixed_precision=no"]).launch.mixed_precision == "no"  # YAML's false


def test_flow_grpo_batches_are_checked_for_the_launchs_process_count(tmp_path):
    """What plan_epoch would refuse on every rank after the model loaded, validation says first."""
    path = write(tmp_path, {**BASE, "algorithm": "flow_grpo", "flow_grpo": {
        "group_size": 24, "prompts_per_epoch": 48, "batch_size": 8, "updates_per_epoch": 2}})
    assert load_recipe(path, ["launch.num_processes=8"]).launch.num_processes == 8
    with pytest.raises(ConfigError, match=r"flow_grpo: 9 batches per process per epoch cannot be split into "
                                          r"flow_grpo.updates_per_epoch = 2 updates \(launch.num_processes = 16\)"):
        load_recipe(path, ["launch.num_processes=16"])


def test_reward_model_architecture_is_checked_with_the_recipe(tmp_path):
    """Before the generator loads: an unknown or bad DiNa-LRM field, or one that init_from would ignore."""
    path = write(tmp_path, {"algorithm": "reward_model", "reward_model": {"data": {"train": "shapes:drawn:8"}}})
    with pytest.raises(ConfigError, match=r"reward_model\.model: DiNaLRMConfig: unknown field\(s\) \['lora_rank'\]"):
        load_recipe(path, ["reward_model.model.lora_rank=64"])
    with pytest.raises(ConfigError, match=r"reward_model\.model: DiNaLRMConfig\.lora_r: must be > 0, got -1"):
        load_recipe(path, ["reward_model.model.lora_r=-1"])
    with pytest.raises(ConfigError, match=r"reward_model\.model: has no effect with init_from"):
        load_recipe(path, ["reward_model.model.lora_r=8", "reward_model.init_from=some/checkpoint"])
    assert load_recipe(path, ["reward_model.model.lora_r=8"]).reward_model.model == {"lora_r": 8}


def test_shipped_recipes_are_found_in_the_source_tree_and_a_missing_one_names_where_it_looked():
    from rlkit.confload import recipe_dirs, shipped_recipe

    assert shipped_recipe("refl_shapes.yaml") in RECIPES
    with pytest.raises(FileNotFoundError, match=r"no-such\.yaml: no such shipped recipe in .*recipes or .*share"):
        shipped_recipe("no-such.yaml")
    assert recipe_dirs()[0] == Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.slow
def test_a_built_wheel_installs_the_recipes_where_shipped_recipe_finds_them(tmp_path):
    """`pip install rlkit` (no clone), here into a prefix of its own as `--user` would: the demo, the build and the
    sweeps' ``base: ../x.yaml`` still find the recipes, through the install's record of its files."""
    import os
    import shutil
    import subprocess
    import sys

    def installed() -> str:  # asked in a fresh process (this one caches metadata), away from the source tree
        return subprocess.run([sys.executable, "-m", "pip", "show", "rlkit"], cwd=tmp_path, capture_output=True,
                              text=True).stdout

    ours = installed()
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # built from a copy: pip builds in the tree it is given
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for name in ("rlkit", "rewards", "recipes"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True)
    prefix = tmp_path / "prefix"
    wheel = next((tmp_path / "dist").glob("rlkit-*.whl"))
    # --ignore-installed: otherwise pip uninstalls the rlkit this test runs from (--prefix does not stop it)
    subprocess.run(pip + ["install", "--no-deps", "--ignore-installed", "--prefix", str(prefix), str(wheel)],
                   check=True, capture_output=True)
    site = next(prefix.glob("lib/python*/site-packages"))
    probe = ("import rlkit.confload as c; from rlkit.sweep import load_sweep; "
             "print(c.__file__); print(c.shipped_recipe('refl_shapes.yaml')); "
             "print(load_sweep(c.shipped_recipe('sweeps/shapes_reward_ablation.yaml')).validate()[0].algorithm)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(site))).stdout.splitlines()
    assert out[0].startswith(str(site)), out  # the installed copy, not the editable source tree
    assert Path(out[1]) == prefix / "share" / "rlkit" / "recipes" / "refl_shapes.yaml"
    assert out[2] == "refl"
    assert installed() == ours  # the install the tests run from is left as it was
    shared = prefix / "share" / "rlkit" / "recipes"
    assert (sorted(p.relative_to(shared) for p in shared.rglob("*.yaml"))
            == sorted(p.relative_to(root / "recipes") for p in (root / "recipes").rglob("*.yaml")))


def test_reward_model_evaluation_levels_are_scoreable_noise_levels(tmp_path):
    path = write(tmp_path, {"algorithm": "reward_model", "reward_model": {"data": {"train": "shapes:drawn:8",
                                                                                  "eval": "shapes:drawn:8:1"}}})
    with pytest.raises(ConfigError, match=r"reward_model\.eval_levels\.0: must lie in \(0, 1\].*got 0\.0"):
        load_recipe(path, ["reward_model.eval_levels=[0.0]"])
    with pytest.raises(ConfigError, match=r"reward_model\.eval_levels: must name at least one noise level"):
        load_recipe(path, ["reward_model.eval_levels=[]"])


def test_a_run_resumes_on_another_port_and_text_cache_size(tmp_path):
    from rlkit.trainers.common import check_resumable

    save_resolved(recipe_from_dict({**BASE, "output_dir": str(tmp_path)}), tmp_path)
    check_resumable(tmp_path / "recipe.yaml", recipe_from_dict({**BASE, "output_dir": str(tmp_path)}, [
        "launch.main_process_port=29511", "model.text_cache_size=8"]))
    with pytest.raises(ValueError, match=r"model\.resolution: 32 -> 64"):
        check_resumable(tmp_path / "recipe.yaml", recipe_from_dict({**BASE, "output_dir": str(tmp_path)},
                                                                   ["model.resolution=64"]))


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
                          "rewards": [{"name": "dina-lrm", "args": {"pretrained": "pkg://rlkit/shapes/assets/dina_lrm",
                                                                    "u": 0.4}}]})
    root = Path(rlkit.__file__).parent
    assert r.model.pretrained == str(root / "shapes/assets/generator")
    assert r.rewards[0].args == {"pretrained": str(root / "shapes/assets/dina_lrm"), "u": 0.4}


def test_package_path_turns_paths_inside_the_package_back_into_pkg_names(tmp_path):
    import rlkit

    root = Path(rlkit.__file__).parent
    recipe = recipe_from_dict({"algorithm": "refl", "model": {"pretrained": "pkg://rlkit/shapes/assets/generator"},
                               "rewards": [{"name": "dina-lrm", "args": {"pretrained": str(tmp_path)}}]})
    recorded = package_path(recipe.to_dict())
    assert recorded["model"]["pretrained"] == "pkg://rlkit/shapes/assets/generator"
    assert recorded["rewards"][0]["args"]["pretrained"] == str(tmp_path)  # outside the package: unchanged
    assert package_path([str(root / "a" / "b.parquet"), "shapes:drawn:16", 3]) == [
        "pkg://rlkit/a/b.parquet", "shapes:drawn:16", 3]
    assert package_path(str(root.parent / "rlkitx" / "y")) == str(root.parent / "rlkitx" / "y")  # a sibling folder


def test_a_reward_written_as_a_bare_name_is_reported_not_crashed_on(tmp_path):
    for rewards, key in [(["pickscore"], "rewards.0"), ([{"name": "latent-direction"}, "hpsv3"], "rewards.1")]:
        with pytest.raises(ConfigError, match=rf"{key}: expected a mapping \(RewardSpec\), got '\w+'") as err:
            recipe_from_dict({**BASE, "rewards": rewards})
        assert len(err.value.problems) == 1
    with pytest.raises(ConfigError, match=r"rewards\.1\.weight: expected a number, got 'abc'"):
        recipe_from_dict({**BASE, "rewards": [{"name": "latent-direction"}, {"name": "pickscore", "weight": "abc"}]})


def test_a_key_given_twice_in_a_recipe_is_refused_with_its_lines(tmp_path):
    """Plain YAML keeps the last one: a section pasted twice would silently reset the first one's settings."""
    path = tmp_path / "twice.yaml"
    path.write_text("algorithm: refl\nrefl:\n  num_steps: 10\n  max_steps: 3\nrefl:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: line 5: .*'refl' is given twice \(lines 2 and 5\)"):
        load_recipe(path)
    path.write_text("algorithm: refl\noptim: {lr: 1.0e-4, lr: 1.0e-2}\n")
    with pytest.raises(ConfigError, match=r"'lr' is given twice"):
        load_recipe(path)
    from rlkit.confload import read_yaml

    path.write_text("base: &d {lr: 1.0e-4, eps: 1.0e-6}\noptim:\n  <<: *d\n  lr: 1.0e-2\n")  # merged, then set
    assert read_yaml(path)["optim"] == {"lr": 1.0e-2, "eps": 1.0e-6}
    # an anchored mapping that merges and sets a key itself, merged again elsewhere (PyYAML flattens it in place)
    path.write_text("g: &ld {<<: {seed: 1, scale: 2.0}, seed: 3}\nr: {<<: *ld}\n")
    assert read_yaml(path) == {"g": {"seed": 3, "scale": 2.0}, "r": {"seed": 3, "scale": 2.0}}
    for text, message in [("? [a, b]\n: 1\n", "found unhashable key"), ("optim: !!map foo\n", "expected a mapping")]:
        path.write_text(text)  # reported, not raised past the loader
        with pytest.raises(ConfigError, match=message):
            read_yaml(path)


def test_negative_or_nan_values_are_refused_where_they_would_switch_a_term_off():
    with pytest.raises(ConfigError) as err:
        recipe_from_dict({**BASE, "algorithm": "flow_grpo"}, ["flow_grpo.kl_beta=-1", "optim.weight_decay=.nan",
                                                             "rewards.0.weight=.nan"])
    assert {(p.key, p.message) for p in err.value.problems} == {
        ("flow_grpo.kl_beta", "must be >= 0, got -1.0"), ("optim.weight_decay", "must be >= 0, got nan"),
        ("rewards.0.weight", "must be a finite number, got nan")}


@pytest.mark.parametrize("reward, key, message", [
    ({"name": "dina-lrm", "args": {"pretrained": "x", "u": "abc"}}, "rewards.0.args.u", "expected a number, got 'abc'"),
    ({"name": "dina-lrm", "args": {"pretrained": "x", "mode": "State"}}, "rewards.0.args.mode",
     r"expected one of 'renoise', 'state', 'ensemble', got 'State' \(did you mean 'state'\?\)"),
    ({"name": "dina-lrm", "args": {"u": 0.4}}, "rewards.0.args", "give exactly one of `pretrained`"),
    ({"name": "dina-lrm", "args": {"pretrained": "x", "u": 3}}, "rewards.0.args", r"'u': must lie in \[0, 1\]"),
    ({"name": "pickscore", "args": {"normalize": "affin"}}, "rewards.0.args.normalize", "did you mean 'affine'"),
    ({"name": "weighted", "args": {"components": []}}, "rewards.0.args.components", "must list at least one"),
    ({"name": "weighted", "args": {"components": [{"name": "latent-direction"}, {"name": "nope"}]}},
     "rewards.0.args.components.1.name", "unknown reward 'nope'"),
    ({"name": "weighted", "args": {"components": [{"name": "dina-lrm", "args": {"pretrained": "x", "u": "a"}}]}},
     "rewards.0.args.components.0.args.u", "expected a number"),
    ({"name": "os:getcwd"}, "rewards.0.name", "not a rewards.base.Reward class"),
    ({"name": "weighted", "args": {"components": [{"name": "latent-direction", "weight": float("nan")}]}},
     "rewards.0.args.components.0.weight", "must be a finite number, got nan"),
])
def test_reward_args_are_checked_for_type_and_value_before_any_weight_loads(reward, key, message):
    """What a reward's options class (DiNa-LRM, PickScore, HPSv3) or a mixture's components refuse, at validation,
    not as a traceback after the generator has loaded."""
    with pytest.raises(ConfigError) as err:
        recipe_from_dict({"algorithm": "flow_grpo", "rewards": [reward]})
    assert any(p.key == key and re.search(message, p.message) for p in err.value.problems), err.value.problems


def test_local_paths_that_do_not_exist_are_refused_before_any_weight_loads(tmp_path):
    """Written as local paths (absolute, ./, pkg://): the generator, a DiNa-LRM's checkpoint and base model, and
    preference data. Hub ids and bare relative paths (data a user has yet to make) are left to the run."""
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as err:
        recipe_from_dict({"algorithm": "refl", "model": {"pretrained": missing},
                          "rewards": [{"name": "dina-lrm", "args": {"pretrained": "./nope-rm", "base_model": missing,
                                                                    "mode": "state"}}],
                          "reward_model": {"data": {"train": [missing, "shapes:drawn:8"], "eval": "pkg://rlkit/nope"}}})
    got = {p.key: p.message for p in err.value.problems}
    assert got.keys() == {"model.pretrained", "rewards.0.args.pretrained", "rewards.0.args.base_model",
                          "reward_model.data.train.0", "reward_model.data.eval"}, got
    assert got["model.pretrained"] == f"no such folder: {missing} (expected a local folder or a hub id)"
    inside = resolve_package_path("pkg://rlkit/nope")
    assert got["reward_model.data.eval"].startswith(f"no such file or folder: {inside}")
    recipe = recipe_from_dict({"algorithm": "refl", "model": {"pretrained": "stabilityai/stable-diffusion-3.5-medium"},
                               "rewards": [{"name": "dina-lrm", "args": {"pretrained": "some/hub-checkpoint"}}],
                               "reward_model": {"data": {"train": "data/made/later.parquet", "eval": "hf:x/y"}}})
    assert recipe.model.pretrained == "stabilityai/stable-diffusion-3.5-medium"


def test_flow_grpo_noise_level_defaults_to_the_samplers_own():
    """Flow-GRPO's flow-SDE runs at a = 0.7, Fast's CPS at 0.8; a recipe that names only the sampler gets its own."""
    def noise(*overrides: str) -> float:
        return recipe_from_dict({**BASE, "algorithm": "flow_grpo"}, list(overrides)).flow_grpo.noise_level

    assert noise() == noise("flow_grpo.sde=cps") == 0.8
    assert noise("flow_grpo.sde=sde") == 0.7
    assert noise("flow_grpo.sde=sde", "flow_grpo.noise_level=0.5") == 0.5


def test_a_problem_an_override_made_is_the_command_lines_not_the_files(tmp_path):
    path = write(tmp_path, {**BASE, "refl": {"max_stepz": 3}})
    with pytest.raises(ConfigError) as err:
        load_recipe(path, ["optim.lrr=1e-4", "refl.max_steps=abc"])
    files = {p.key: p.file for p in err.value.problems}
    assert files == {"refl.max_stepz": str(path), "optim.lrr": f"{path} (set on the command line)",
                     "refl.max_steps": f"{path} (set on the command line)"}, files
