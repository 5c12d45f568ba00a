"""HPSv3 adapter on a tiny random Qwen2-VL saved locally, with a checkpoint in the released key layout."""

from __future__ import annotations

import pytest
import torch

import rewards
from rewards.base import MemoDecode, RewardInput
from rewards.hpsv3 import (
    INSTRUCTION,
    PIXEL_BUDGET,
    REWARD_TOKEN,
    hpsv3_chat_text,
    hpsv3_image_size,
    hpsv3_num_image_tokens,
    hpsv3_user_text,
)
from rlkit.models.sd3 import WeightsNotFoundError

PROMPTS = ["a red circle", "two blue squares on the left", "a star"]
TINY_PIXELS = 4 * 8 * 8  # tiny model: patch 4, merge 2 -> factor 8; a 16 x 16 image, 4 visual tokens


@pytest.fixture(scope="module")
def tiny_hpsv3(tmp_path_factory):
    from rewards.tiny import save_tiny_hpsv3

    return save_tiny_hpsv3(tmp_path_factory.mktemp("hpsv3") / "qwen2vl")


def _build(tiny_hpsv3, **kwargs):
    base, checkpoint = tiny_hpsv3
    args = dict(model=str(base), checkpoint=str(checkpoint), dtype="fp32", pixels=TINY_PIXELS)
    return rewards.build("hpsv3", **{**args, **kwargs})


@pytest.fixture(scope="module")
def reward(tiny_hpsv3):
    return _build(tiny_hpsv3, micro_batch_size=2)


def _images(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# -- prompt and image-size arithmetic, against hand-worked values ------------------------------------------
def test_prompt_template_hand_worked():
    text = hpsv3_user_text("a cat")
    assert text.startswith("\nYou are tasked with evaluating a generated image based on Visual Quality and Text")
    assert "with 0 being the worst and 10 being the best. \n\n**Visual Quality:**  \n" in text
    assert "**Text Alignment:**  \nAssess how well" in text
    assert text.endswith(
        "Textual prompt - a cat\n\n\n\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
    )
    assert text.count(REWARD_TOKEN) == 1 and INSTRUCTION.count("{text_prompt}") == 1
    chat = hpsv3_chat_text("a cat", num_image_tokens=3)
    assert chat == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>" + text + "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_text_equals_the_chat_template(reward):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": hpsv3_user_text("a dog")}]}]
    rendered = reward.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == hpsv3_chat_text("a dog")


@pytest.mark.parametrize(
    "size, expected, tokens",
    [
        ((512, 512), (448, 448), 256),  # round(512/28)*28 = 504, 504^2 > budget -> beta = 512/448 -> 448
        ((1024, 1024), (448, 448), 256),  # beta = 1024/448 -> 448
        ((448, 448), (448, 448), 256),  # already 16 x 28
        ((256, 256), (448, 448), 256),  # 252^2 < budget -> beta = 1.75 -> ceil(448/28)*28
        ((768, 1344), (336, 588), 252),  # beta = sqrt(768*1344/200704) = 2.268 -> floor(12.09)*28, floor(21.17)*28
    ],
)
def test_image_size_arithmetic(size, expected, tokens):
    assert PIXEL_BUDGET == 200704
    assert hpsv3_image_size(*size) == expected
    assert hpsv3_num_image_tokens(*size) == tokens


# -- the tiny model --------------------------------------------------------------------------------------
def test_scores_shape_and_micro_batching(reward, tiny_hpsv3):
    images = _images(3, 16, 16)
    out = reward(RewardInput(prompts=PROMPTS, images=images))
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32 and torch.isfinite(out.scores).all()
    assert set(out.extras) == {"raw", "sigma"}
    one_pass = _build(tiny_hpsv3, micro_batch_size=8)(RewardInput(prompts=PROMPTS, images=images))
    torch.testing.assert_close(one_pass.scores, out.scores, atol=1e-5, rtol=1e-5)
    # the score depends on the prompt and on the image
    swapped = reward(RewardInput(prompts=[PROMPTS[1], PROMPTS[0], PROMPTS[2]], images=images))
    assert not torch.allclose(swapped.scores[:2], out.scores[:2])


def test_tensor_preprocessing_matches_image_processor(reward):
    from PIL import Image
    from transformers import AutoImageProcessor

    base = reward.config.model
    processor = AutoImageProcessor.from_pretrained(base, size={"shortest_edge": TINY_PIXELS,
                                                               "longest_edge": TINY_PIXELS})
    for h, w in [(16, 16), (24, 24), (20, 12), (33, 47)]:
        images = (_images(2, h, w, seed=h) * 255).round() / 255
        pil = [Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()) for x in images]
        ref = processor(images=pil, return_tensors="pt")  # the path of HPSv3's own inference (PIL images)
        mine, grid = reward.preprocess(images)
        torch.testing.assert_close(grid, ref["image_grid_thw"])
        assert mine.shape == ref["pixel_values"].shape
        diff = (mine - ref["pixel_values"]).abs()
        if (h, w) == (16, 16):  # no resize: only normalisation and the patch layout
            assert diff.max() < 1e-5
        else:  # PIL's 8-bit bicubic vs torch's antialiased bicubic: about 1/255 apart (/ std ~0.27)
            assert diff.mean() < 0.01 and diff.max() < 0.05


def _reference_mu(reward, images, prompts):
    """Independent path: Qwen2VLForConditionalGeneration from the base folder, vocabulary resized, the
    checkpoint loaded in transformers' own key layout; image processor + chat template + tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    from rewards.hpsv3 import rm_head

    base, checkpoint = reward.config.model, reward.config.checkpoint
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]}, replace_extra_special_tokens=False)
    model = Qwen2VLForConditionalGeneration.from_pretrained(base).eval()
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    state = load_file(checkpoint)
    head = rm_head(model.config.text_config.hidden_size).eval()
    head.load_state_dict({k[len("rm_head."):]: v for k, v in state.items() if k.startswith("rm_head.")})
    renamed = {}
    for k, v in state.items():
        if k.startswith("visual."):
            renamed["model.visual." + k[len("visual."):]] = v
        elif k.startswith("model."):
            renamed["model.language_model." + k[len("model."):]] = v
        elif k.startswith("lm_head."):
            renamed[k] = v
    model.load_state_dict(renamed, strict=True)
    processor = AutoImageProcessor.from_pretrained(base, size={"shortest_edge": TINY_PIXELS,
                                                               "longest_edge": TINY_PIXELS})
    vis = processor(images=list(images), do_rescale=False, return_tensors="pt")
    n = int(vis["image_grid_thw"][0].prod()) // 4
    texts = []
    for p in prompts:
        msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": hpsv3_user_text(p)}]}]
        text = tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
        texts.append(text.replace("<|image_pad|>", "<|image_pad|>" * n))
    enc = tok(texts, padding=True, padding_side="right", return_tensors="pt")
    seq = enc["input_ids"].shape[1]
    positions = torch.arange(seq).view(1, 1, -1).expand(3, len(prompts), -1)  # HPSv3: sequential positions
    with torch.no_grad():
        hidden = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             pixel_values=vis["pixel_values"], image_grid_thw=vis["image_grid_thw"],
                             position_ids=positions).last_hidden_state
        at = enc["input_ids"] == tok.convert_tokens_to_ids(REWARD_TOKEN)
        return head(hidden[at])[:, 0]


def test_matches_reference_qwen2vl(reward):
    images = (_images(3, 16, 16, seed=3) * 255).round() / 255
    mine = reward(RewardInput(prompts=PROMPTS, images=images)).scores
    torch.testing.assert_close(mine, _reference_mu(reward, images, PROMPTS), atol=1e-5, rtol=1e-4)


def test_no_graph_unless_asked(reward):
    images = _images(2, 16, 16)
    assert not reward(RewardInput(prompts=PROMPTS[:2], images=images)).scores.requires_grad
    with torch.no_grad():
        assert not reward(RewardInput(prompts=PROMPTS[:2], images=images.requires_grad_())).scores.requires_grad
    assert all(not p.requires_grad for p in reward.parameters())


def test_gradients_reach_latents_through_decode(reward, tiny_generator):
    latents = torch.randn(2, *tiny_generator.latent_shape(16), generator=torch.Generator().manual_seed(0))
    latents.requires_grad_()
    decode = MemoDecode(tiny_generator.decode)
    out = reward(RewardInput(prompts=PROMPTS[:2], latents=latents, decode=decode))
    out.scores.sum().backward()
    assert decode.calls == 1
    assert latents.grad is not None and torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients(tiny_hpsv3, reward, checkpoint_calls, monkeypatch):
    import transformers.modeling_utils

    # transformers holds its own reference to torch's checkpoint: point it at the counting one
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", torch.utils.checkpoint.checkpoint)
    ckpt = _build(tiny_hpsv3, gradient_checkpointing=True)
    for r, backbone_flag in ((reward, False), (ckpt, True)):
        r.train()  # a trainer switching modes leaves the reward in inference mode
        assert not r.model.rm_head.training and r.model.backbone.training == backbone_flag
    grads, calls = [], []
    for r in (reward, ckpt):
        images = _images(2, 16, 16, seed=5).requires_grad_()
        checkpoint_calls.clear()
        r(RewardInput(prompts=PROMPTS[:2], images=images)).scores.sum().backward()
        grads.append(images.grad)
        calls.append(len(checkpoint_calls))
    layers = ckpt.model.backbone.config.text_config.num_hidden_layers
    assert calls[0] == 0 and calls[1] >= layers, calls  # every decoder layer is checkpointed
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_missing_checkpoint_names_it(tiny_hpsv3, tmp_path):
    base, _ = tiny_hpsv3
    with pytest.raises(WeightsNotFoundError) as err:
        rewards.build("hpsv3", model=str(base), checkpoint="nobody/no-such-hpsv3")
    msg = str(err.value)
    assert "nobody/no-such-hpsv3" in msg and "HPSv3.safetensors" in msg and "hf download" in msg
    assert err.value.__suppress_context__ and len(msg) < 800
    with pytest.raises(WeightsNotFoundError, match="no HPSv3.safetensors in it"):
        rewards.build("hpsv3", model=str(base), checkpoint=str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="Qwen2-VL base model"):
        rewards.build("hpsv3", model=str(tmp_path / "no-base"), checkpoint=str(base))


def test_checkpoint_for_another_model_is_refused(tiny_hpsv3, tmp_path):
    from safetensors.torch import load_file, save_file

    base, checkpoint = tiny_hpsv3
    state = {k: v for k, v in load_file(str(checkpoint)).items() if not k.startswith("rm_head.")}
    save_file(state, str(tmp_path / "HPSv3.safetensors"))
    with pytest.raises(ValueError, match="missing.*rm_head"):
        rewards.build("hpsv3", model=str(base), checkpoint=str(tmp_path), dtype="fp32")


def test_meta_cost_matches_hand_count():
    from rewards.cost import HPSV3_VOCAB, hpsv3_parts

    parts = hpsv3_parts(512, text_tokens=300)
    d, ff, layers, heads, kv_heads = 3584, 18944, 28, 28, 4
    kv = d // heads * kv_heads
    block = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * ff + 2 * d  # q/k/v (bias), o, MLP, 2 RMSNorms
    assert parts["qwen2vl_decoder"].params == layers * block + HPSV3_VOCAB * d + d
    assert 670e6 < parts["qwen2vl_vision"].params < 680e6  # the 675 M vision tower of Qwen2-VL
    seq = 256 + 300  # 448^2 image -> 256 visual tokens
    matmul = layers * (block - d - 2 * kv - 2 * d)  # weights of the matmuls (biases and norms removed)
    hand = 2 * seq * matmul + layers * 2 * 2 * heads * seq * seq * (d // heads)
    assert abs(parts["qwen2vl_decoder"].flops - hand) / hand < 0.01


def test_bf16_backbone_keeps_an_fp32_head(tiny_hpsv3, reward):
    half = _build(tiny_hpsv3, dtype="bf16")
    assert half.model.backbone.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.model.rm_head.parameters())
    images = _images(2, 16, 16, seed=7)
    out = half(RewardInput(prompts=PROMPTS[:2], images=images))
    assert out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, reward(RewardInput(prompts=PROMPTS[:2], images=images)).scores,
                               atol=0.05, rtol=0.05)
