"""Single-process checks of the accelerator helpers and of seeding (the 2-process runs are in test_distributed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlkit.config import LaunchConfig
from rlkit.runtime.accelerator import (
    build_accelerator,
    make_deepspeed_plugin,
    prepare_frozen,
    set_deepspeed_batch_size,
    uses_deepspeed,
    zero_stage,
)
from rlkit.runtime.seeding import Generators, derive_seed, make_generator, seed_everything


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_single_process_accelerator_and_frozen_helper():
    accelerator = build_accelerator(LaunchConfig(), grad_accum=2, micro_batch=3)
    assert accelerator.num_processes == 1 and accelerator.gradient_accumulation_steps == 2
    assert not uses_deepspeed(accelerator) and zero_stage(accelerator) is None
    frozen = prepare_frozen(accelerator, torch.nn.Linear(2, 2))
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_a_launchers_exported_accumulation_and_a_wrong_process_count_do_not_pass(monkeypatch):
    """``accelerate config`` exports its accumulation steps to every launched process; the recipe's count wins.
    A run started with another process count than the recipe's launch section is refused."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    assert build_accelerator(LaunchConfig(), grad_accum=2).gradient_accumulation_steps == 2
    with pytest.raises(RuntimeError, match=r"launch.num_processes=2 but this run has 1 process"):
        build_accelerator(LaunchConfig(num_processes=2))


def test_deepspeed_refuses_accelerate_use_cpu_and_stage_mismatch(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU"):
        build_accelerator(LaunchConfig(deepspeed=2))
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(RuntimeError, match="launch.deepspeed=2"):
        build_accelerator(LaunchConfig(deepspeed=2))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match="launch.deepspeed=null"):
        build_accelerator(LaunchConfig())


def test_deepspeed_plugin_settings():
    plugin = make_deepspeed_plugin(3, grad_clip=0.7, grad_accum=4)
    config = plugin.deepspeed_config
    assert config["zero_optimization"]["stage"] == 3 and config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.7
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    # no clip requested: no clipping (accelerate alone would fill in 1.0)
    assert make_deepspeed_plugin(2, grad_clip=None).deepspeed_config["gradient_clipping"] == 0.0
    with pytest.raises(ValueError, match="stage"):
        make_deepspeed_plugin(1)


def test_deepspeed_batch_sizes_follow_world_size():
    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}
    fake = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)),
                           gradient_accumulation_steps=4, num_processes=2)
    set_deepspeed_batch_size(fake, 3)
    assert config == {"train_micro_batch_size_per_gpu": 3, "train_batch_size": 3 * 4 * 2}
    config["gradient_accumulation_steps"] = 5  # the plugin's count, where a launcher's setting would differ
    set_deepspeed_batch_size(fake, 3)
    assert config["train_batch_size"] == 3 * 5 * 2
    with pytest.raises(ValueError, match="micro_batch"):
        set_deepspeed_batch_size(fake, 0)


def test_derive_seed_is_pinned_and_key_sensitive():
    assert derive_seed(0, "step", 3) == 1036845239580906208  # same value in every process and Python run
    seeds = {derive_seed(0, "step", 3), derive_seed(0, "step", 4), derive_seed(1, "step", 3), derive_seed(0, "step3")}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert torch.equal(torch.rand(3, generator=make_generator(5, "a")), torch.rand(3, generator=make_generator(5, "a")))


def test_generators_per_purpose_and_rank_and_state_round_trip():
    gens = seed_everything(11, rank=0)
    other_rank = Generators(11, rank=1)
    noise = torch.rand(4, generator=gens["noise"])
    assert not torch.equal(noise, torch.rand(4, generator=gens["data"]))
    assert not torch.equal(noise, torch.rand(4, generator=other_rank["noise"]))
    state = gens.state_dict()
    want = torch.rand(4, generator=gens["noise"])
    restored = Generators(11, rank=0)
    restored.load_state_dict(state)
    assert torch.equal(torch.rand(4, generator=restored["noise"]), want)
    # the global RNG differs per rank (dropout) but is reproducible
    seed_everything(11, rank=1)
    a = torch.rand(2)
    seed_everything(11, rank=1)
    assert torch.equal(a, torch.rand(2))
    seed_everything(11, rank=0)
    assert not torch.equal(a, torch.rand(2))


@pytest.mark.parametrize("name, kind, stage", [("ddp", "MULTI_GPU", None), ("zero2", "DEEPSPEED", 2),
                                               ("zero3", "DEEPSPEED", 3)])
def test_launcher_files_load_in_accelerate(name, kind, stage):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / f"{name}.yaml"
    assert path.read_text().startswith("# Launcher file")
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == kind and config.num_processes == -1  # the count is a launch argument
    assert (config.deepspeed_config or {}).get("zero_stage") == stage
