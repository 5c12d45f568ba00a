import warnings

import pytest
import torch

from rlkit.models.sd3 import SD3Generator, WeightsNotFoundError, dtype_argument
from rlkit.models.tiny import TinySD3Config, build_tiny_sd3_pipeline


def test_tiny_pipeline_roundtrip_gives_identical_outputs(tmp_path):
    pipe = build_tiny_sd3_pipeline(TinySD3Config(), seed=3)
    pipe.save_pretrained(tmp_path / "p")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dtype", category=FutureWarning)  # the installed diffusers' name
        gen = SD3Generator.from_pretrained(tmp_path / "p", dtype="bf16", max_sequence_length=16)
    assert {p.dtype for p in gen.transformer.parameters()} == {torch.bfloat16}
    gen = SD3Generator.from_pretrained(tmp_path / "p", max_sequence_length=16)
    prompts = ["a red circle on the left", "a blue square"]
    out = []
    for p in (pipe, gen.pipeline):
        p.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        out.append(p(prompts, num_inference_steps=3, height=32, width=32, generator=g, output_type="pt",
                     max_sequence_length=16).images)
    assert out[0].shape == (2, 3, 32, 32)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


@pytest.mark.parametrize("installed, expected", [("0.32.2", "torch_dtype"), ("0.39.0", "torch_dtype"),
                                                  ("0.40.0", "dtype"), ("0.42.1", "dtype"), ("1.0.0.dev0", "dtype")])
def test_the_dtype_argument_follows_diffusers_rename(installed, expected):
    assert dtype_argument(installed) == expected


def test_generator_encodes_with_cache_and_converts_latents(tiny_generator):
    gen = tiny_generator
    text = gen.encode_prompts(["a red circle", "a blue square", "a red circle"])
    # SD3 layout: 77-token CLIP states (here 16) then T5 tokens (max_sequence_length 16), width = T5 d_model
    assert text.encoder_hidden_states.shape == (3, 32, 32)
    assert text.pooled_projections.shape == (3, 32)
    torch.testing.assert_close(text.encoder_hidden_states[0], text.encoder_hidden_states[2])
    assert len(gen._cache) == 2
    images = torch.rand(2, 3, 32, 32)
    z = gen.encode(images)
    assert z.shape == (2, *gen.latent_shape(32))
    z.requires_grad_(True)
    x = gen.decode(z)
    assert x.shape == (2, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    x.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    sig = gen.sigmas(4)
    assert sig.shape == (5,) and sig[0] == 1 and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()


def test_a_prompts_embedding_does_not_depend_on_what_was_encoded_with_it_or_the_cache_limit(tiny_sd3_dir):
    """What makes a resumed run equal an uninterrupted one: each prompt is encoded on its own, and prompts past
    ``cache_limit`` are encoded the same way without being kept."""
    prompts = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("circle", "square")
               for p in ("left", "right")]
    together = SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=16).encode_prompts(prompts)
    limited = SD3Generator.from_pretrained(tiny_sd3_dir, max_sequence_length=16)
    limited.cache_limit = 2
    for order in (prompts[::-1][:5], prompts, prompts[3:]):  # other groupings, most prompts past the limit
        text = limited.encode_prompts(order)
        for i, prompt in enumerate(order):
            j = prompts.index(prompt)
            assert torch.equal(text.encoder_hidden_states[i], together.encoder_hidden_states[j]), prompt
            assert torch.equal(text.pooled_projections[i], together.pooled_projections[j]), prompt
    assert list(limited._cache) == prompts[::-1][:2]  # the first two it saw, no more


def test_the_recipe_bounds_the_text_cache_of_the_generator_and_of_a_reward_on_its_encoders(tiny_sd3_dir):
    """A large prompt set must not fill the accelerator with embeddings (SD3.5: 1.3-2.7 MB each)."""
    from rewards.dina_lrm import DiNaLRMConfig
    from rewards.dina_lrm.reward import DiNaLRMReward
    from rlkit.config import TEXT_CACHE_SIZE, ModelConfig
    from rlkit.trainers.common import load_generator

    assert SD3Generator.from_pretrained(tiny_sd3_dir).cache_limit == TEXT_CACHE_SIZE
    gen = load_generator(ModelConfig(pretrained=str(tiny_sd3_dir), max_sequence_length=16, text_cache_size=2))
    prompts = ["a red circle", "a blue square", "a green cross"]
    gen.encode_prompts(prompts)
    assert list(gen._cache) == prompts[:2]
    reward = DiNaLRMReward(config=DiNaLRMConfig(num_transformer_layers=1, visual_head_idx=(1,), text_head_idx=(1,),
                                                lora_r=2, num_attn_heads=4, num_queries=2, max_sequence_length=16),
                           base_model=str(tiny_sd3_dir))
    reward.attach_generator(gen)
    reward.encode_prompts(prompts)
    assert list(reward._text_encoder._cache) == prompts[:2]


def test_a_bf16_transformer_reads_the_fp32_timestep(tiny_generator):
    """As diffusers' pipeline passes it: bf16 would round 953.42 to 952 (steps of 4 above 512)."""
    seen = []
    model = tiny_generator.transformer.to(torch.bfloat16)
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True)
    sigmas = torch.tensor([0.95342, 0.5])
    text = tiny_generator.encode_prompts(["a red circle", "a blue square"])
    size = model.config.sample_size
    v = tiny_generator.velocity(torch.randn(2, model.config.in_channels, size, size), sigmas, text)
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], sigmas * 1000)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_missing_weights_message_names_source_and_remedy(tmp_path):
    import pytest

    with pytest.raises(WeightsNotFoundError, match="nope/not-a-model.*`hf download nope/not-a-model`"):
        SD3Generator.from_pretrained("nope/not-a-model")
    for path in (tmp_path / "missing", "./missing", "~/no/such/folder"):  # paths are not hub ids: no download hint
        with pytest.raises(WeightsNotFoundError, match="there is no folder") as err:
            SD3Generator.from_pretrained(path)
        assert "download" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="not a complete"):
        SD3Generator.from_pretrained(tmp_path / "empty")


def test_a_weights_file_cut_short_names_the_folder(tmp_path, tiny_sd3_dir):
    import shutil

    import pytest

    broken = shutil.copytree(tiny_sd3_dir, tmp_path / "broken")
    weights = next((broken / "text_encoder").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(WeightsNotFoundError, match=rf"folder '{broken}' exists but is not a complete SD3 pipeline "
                                                  r"folder \(SafetensorError"):
        SD3Generator.from_pretrained(broken)
