"""LoRA helpers: adapter switching inside one autograd graph, with and without gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

from rlkit.models.lora import (
    SD3_ATTN_TARGETS,
    active_adapters,
    add_lora,
    enable_adapter_aware_checkpointing,
    load_lora_state_dict,
    lora_state_dict,
    trainable_parameters,
    use_adapter,
)
from rlkit.models.tiny import TinySD3Config, build_tiny_sd3_components

CFG = TinySD3Config()
RANK, ALPHA = 4, 8.0
BATCH = 2
TEXT_LEN = 5


@pytest.fixture(scope="module")
def base_transformer():
    transformer = build_tiny_sd3_components(CFG, seed=0)["transformer"]
    transformer.requires_grad_(False)
    return transformer


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(BATCH, CFG.latent_channels, CFG.sample_size, CFG.sample_size, generator=g),
        "encoder_hidden_states": torch.randn(BATCH, TEXT_LEN, CFG.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(BATCH, CFG.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([300.0, 700.0]),
    }


def _forward(model, inputs: dict, hidden: torch.Tensor) -> torch.Tensor:
    return model(**{**inputs, "hidden_states": hidden}, return_dict=False)[0]


def _two_adapter_model(base):
    """Base + adapter A (trainable, non-zero) + adapter B (frozen, non-zero), and A's and B's weights."""
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    add_lora(model, "A", RANK, ALPHA, init="random")
    add_lora(model, "B", RANK, ALPHA, init="random", trainable=False)
    return model


def _lora_grads(model, name: str) -> dict[str, torch.Tensor]:
    marker = f".{name}."
    return {n.replace(marker, "."): p.grad.clone() for n, p in model.named_parameters() if marker in n}


def _shared_graph_grads(model, inputs: dict, second: str | None = "B") -> dict[str, torch.Tensor]:
    """Policy adapter A forward, its output fed through ``second`` (None: base model), backward after leaving it."""
    with use_adapter(model, "A"):
        out_a = _forward(model, inputs, inputs["hidden_states"])
    with use_adapter(model, second):
        out_b = _forward(model, inputs, out_a)
    out_b.square().mean().backward()  # runs with the model's default adapter state active
    return _lora_grads(model, "A")


def _reference_grads(base, model, inputs: dict, second: str | None = "B") -> dict[str, torch.Tensor]:
    """The same computation on two separate copies: A only (trainable) then ``second`` only (frozen)."""
    copy_a, copy_b = copy.deepcopy(base), copy.deepcopy(base)
    add_lora(copy_a, "A", RANK, ALPHA, init="random")
    load_lora_state_dict(copy_a, "A", lora_state_dict(model, "A"))
    if second is not None:
        add_lora(copy_b, second, RANK, ALPHA, init="random", trainable=False)
        load_lora_state_dict(copy_b, second, lora_state_dict(model, second))
    out = _forward(copy_b, inputs, _forward(copy_a, inputs, inputs["hidden_states"]))
    out.square().mean().backward()
    return _lora_grads(copy_a, "A")


def _assert_grads_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(got) > 0
    nonzero = [key for key in want if want[key].abs().sum() > 0]
    assert len(nonzero) > 0.75 * len(want)  # the last block's context queries/keys feed nothing
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)


def test_add_lora_targets_trainability_and_fp32(base_transformer):
    model = copy.deepcopy(base_transformer).to(torch.bfloat16)
    add_lora(model, "policy", RANK, ALPHA)
    add_lora(model, "reward", RANK, ALPHA, block_indices=[1, 2], trainable=False)
    policy = {n for n, p in model.named_parameters() if ".policy." in n}
    reward = {n for n, p in model.named_parameters() if ".reward." in n}
    n_blocks = CFG.num_layers
    # every block: 8 joint-attention targets (last block has no context output) + attn2 for dual blocks
    assert len(policy) > 2 * len(SD3_ATTN_TARGETS) * (n_blocks - 1)
    assert {n.split(".")[1] for n in reward} == {"1", "2"}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)
    assert {id(p) for p in trainable_parameters(model)} == {id(p) for n, p in model.named_parameters() if n in policy}
    assert active_adapters(model) == ["reward"]  # the newest adapter is active, as in peft/diffusers
    inputs = {k: v.bfloat16() for k, v in _inputs().items()}
    with use_adapter(model, "policy"):
        out = _forward(model, inputs, inputs["hidden_states"])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="init"):
        add_lora(model, "bad", RANK, ALPHA, init="zeros")
    with pytest.raises(ValueError, match="already exists"):
        add_lora(model, "policy", RANK, ALPHA)


def test_use_adapter_keeps_requires_grad_and_restores_after_exception(base_transformer):
    model = _two_adapter_model(base_transformer)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with use_adapter(model, "A"):
        assert active_adapters(model) == ["A"]
        with use_adapter(model, None):
            assert active_adapters(model) is None
        assert active_adapters(model) == ["A"]
    assert active_adapters(model) == ["B"]
    with pytest.raises(RuntimeError, match="boom"):
        with use_adapter(model, None):
            raise RuntimeError("boom")
    assert active_adapters(model) == ["B"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(KeyError, match="unknown adapter"):
        with use_adapter(model, "C"):
            pass
    # peft's own switch flips requires_grad: the trap this helper avoids
    model.set_adapter("B")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".A." in n)


def test_disabled_adapters_equal_base_model(base_transformer):
    model = _two_adapter_model(base_transformer)
    inputs = _inputs()
    with torch.no_grad(), use_adapter(model, None):
        out = _forward(model, inputs, inputs["hidden_states"])
    with torch.no_grad():
        want = _forward(base_transformer, inputs, inputs["hidden_states"])
        with use_adapter(model, "A"):
            adapted = _forward(model, inputs, inputs["hidden_states"])
    torch.testing.assert_close(out, want)
    assert (adapted - want).abs().max() > 1e-4  # the adapter does change the output


@pytest.mark.parametrize("second", ["B", None], ids=["adapterB", "base"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_two_adapter_graph_gradients_match_separate_copies(base_transformer, checkpointing, second,
                                                           checkpoint_calls):
    model = _two_adapter_model(base_transformer)
    if checkpointing:
        enable_adapter_aware_checkpointing(model)
    inputs = _inputs()
    got = _shared_graph_grads(model, inputs, second)
    assert len(checkpoint_calls) == (2 * len(model.transformer_blocks) if checkpointing else 0)  # two forwards
    _assert_grads_equal(got, _reference_grads(base_transformer, model, inputs, second))


def test_plain_checkpointing_gives_wrong_gradients(base_transformer):
    """The silent failure adapter-aware checkpointing prevents (so the test above can fail).

    With B trainable too, both forwards save the same tensors, so torch's checkpoint cannot notice that the
    re-run used the wrong adapter (with B frozen it raises a CheckpointError instead).
    """
    model = _two_adapter_model(base_transformer)
    for name, param in model.named_parameters():
        param.requires_grad_(".B." in name or param.requires_grad)
    model.enable_gradient_checkpointing()
    inputs = _inputs()
    got = _shared_graph_grads(model, inputs)
    want = _reference_grads(base_transformer, model, inputs)
    assert max((got[k] - want[k]).abs().max().item() for k in want) > 1e-4


def test_lora_state_dict_roundtrip(base_transformer):
    model = _two_adapter_model(base_transformer)
    state = lora_state_dict(model, "A")
    assert state and all(".A." not in k and ".lora_" in k for k in state)
    other = copy.deepcopy(base_transformer)
    add_lora(other, "A", RANK, ALPHA)
    load_lora_state_dict(other, "A", state)
    for key, value in lora_state_dict(other, "A").items():
        torch.testing.assert_close(value, state[key])
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(other, "A", dict(list(state.items())[1:]))


def test_a_bf16_policy_exports_the_float32_weights_it_is_given(base_transformer, tmp_path):
    """A DeepSpeed bf16 run's module holds rounded LoRA weights; the export writes the float32 ones the trainer passes
    (the EMA's average, else the fp32 masters), and ``trainable_weights`` picks them by parameter."""
    from safetensors.torch import load_file

    from rlkit.export import export_policy_lora
    from rlkit.runtime.ema import EMA
    from rlkit.trainers.common import trainable_weights

    model = copy.deepcopy(base_transformer)
    add_lora(model, "policy", RANK, ALPHA, init="random")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    exact = {n: 1.0 + 0.01 * torch.randn(p.shape, generator=g) for n, p in named}  # finer than bf16 resolves
    model.to(torch.bfloat16)
    with torch.no_grad():
        for n, p in named:
            p.copy_(exact[n])
    module = trainable_weights(model)  # no EMA, no DeepSpeed: the module's own values
    assert all(torch.equal(module[n], p.float()) and not torch.equal(module[n], exact[n]) for n, p in named)
    ema = EMA([p for _, p in named], decay=0.5)
    for shadow, (n, _) in zip(ema.shadow, named):
        shadow.copy_(exact[n])
    assert all(torch.equal(v, exact[n]) for n, v in trainable_weights(model, ema).items())

    written = load_file(export_policy_lora(model, "policy", tmp_path / "exact", weights=exact)
                        / "pytorch_lora_weights.safetensors")
    rounded = load_file(export_policy_lora(model, "policy", tmp_path / "module") / "pytorch_lora_weights.safetensors")
    assert written.keys() == rounded.keys() and len(written) == len(named)
    for n, _ in named:
        key = "transformer." + n.replace(".policy.", ".")
        assert torch.equal(written[key], exact[n]) and torch.equal(rounded[key], exact[n].to(torch.bfloat16).float())


def test_the_policy_adapts_the_joint_attention_as_upstream_and_dina_lrm_every_attention(tiny_sd3_dir):
    """Upstream Flow-GRPO and the DiNa-LRM release's trainers put the policy LoRA on `attn.*` (SD3.5's second image
    attention, attn2, stays frozen); the DiNa-LRM release adapts every attention projection, attn2 included."""
    from rlkit.config import SD3_ATTN_TARGETS, LoRAConfig
    from rlkit.models.sd3 import SD3Generator
    from rlkit.trainers.common import prepare_policy

    for targets, with_attn2 in ((LoRAConfig().target_modules, False), (SD3_ATTN_TARGETS, True)):
        gen = SD3Generator.from_pretrained(tiny_sd3_dir)
        prepare_policy(gen, LoRAConfig(rank=2, alpha=4, target_modules=list(targets)))
        adapted = {n.split(".lora_")[0] for n, _ in gen.transformer.named_parameters() if ".policy" in n}
        modules = dict(gen.transformer.named_modules())
        joint = {n for n in modules if n.startswith("transformer_blocks.") and ".attn." in n
                 and any(n.endswith(f".attn.{t}") for t in SD3_ATTN_TARGETS)}
        second = {n for n in adapted if ".attn2." in n}
        assert joint <= adapted and bool(second) == with_attn2, sorted(adapted - joint)
