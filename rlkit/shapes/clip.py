"""A pixel-space CLIP-style model of the Shapes world (the "VLM reward" baseline).

A small CNN image tower and a bag-of-words text tower, trained contrastively on drawn image-caption
pairs of the training split. Saved and loaded as a folder (``config.json`` + ``model.safetensors``)
through ``huggingface_hub.PyTorchModelHubMixin``, the same ``from_pretrained`` path as hub models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from rlkit.shapes import world
from rlkit.shapes.pretrain import Budget

PAD = "<pad>"


class ShapesClipModel(nn.Module, PyTorchModelHubMixin):
    """Image and caption embeddings on the unit sphere; ``similarity`` is their cosine."""

    def __init__(self, vocabulary: list[str] | tuple[str, ...] = world.VOCABULARY, embed_dim: int = 64,
                 width: int = 32, max_words: int = 12, image_size: int = world.IMAGE_SIZE):
        super().__init__()
        if embed_dim <= 0 or width <= 0 or max_words <= 0:
            raise ValueError("ShapesClipModel: embed_dim, width and max_words must be positive")
        self.vocabulary = [PAD] + [w for w in vocabulary if w != PAD]
        self.word_index = {w: i for i, w in enumerate(self.vocabulary)}
        self.max_words = max_words
        c = width
        self.image_tower = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.GELU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.GELU(),
            nn.Flatten(),
            nn.Linear(4 * c * (image_size // 8) ** 2, 4 * c), nn.GELU(),
            nn.Linear(4 * c, embed_dim),
        )
        self.word_embedding = nn.Embedding(len(self.vocabulary), 4 * c, padding_idx=0)
        self.text_tower = nn.Sequential(nn.GELU(), nn.Linear(4 * c, 4 * c), nn.GELU(), nn.Linear(4 * c, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))

    def tokenize(self, captions: list[str]) -> Tensor:
        """Word ids ``(B, max_words)``; words outside the vocabulary are dropped (id 0 is padding)."""
        ids = torch.zeros(len(captions), self.max_words, dtype=torch.long)
        for i, text in enumerate(captions):
            known = [self.word_index[w] for w in text.lower().split() if w in self.word_index][: self.max_words]
            ids[i, : len(known)] = torch.tensor(known, dtype=torch.long)
        return ids

    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> unit embeddings ``(B, D)``."""
        return F.normalize(self.image_tower(images * 2 - 1), dim=-1)

    def encode_text(self, captions: list[str]) -> Tensor:
        ids = self.tokenize(captions).to(self.word_embedding.weight.device)
        summed = self.word_embedding(ids).sum(1)  # bag of words: the padding row is zero
        return F.normalize(self.text_tower(summed), dim=-1)

    def similarity(self, images: Tensor, captions: list[str]) -> Tensor:
        """Cosine similarity ``(B,)`` of each image with its own caption."""
        return (self.encode_images(images) * self.encode_text(captions)).sum(-1)


def contrastive_loss(model: ShapesClipModel, images: Tensor, captions: list[str]) -> Tensor:
    """Symmetric InfoNCE; several items of a batch may share a caption, so all of them are positives."""
    img, txt = model.encode_images(images), model.encode_text(captions)
    logits = model.logit_scale.exp() * img @ txt.T
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    label = torch.tensor([ids[c] for c in captions], device=logits.device)
    same = (label[:, None] == label[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


@dataclass
class ClipTrainConfig:
    steps: int = 700
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_minutes: float = 12.0  # wall-clock cap on a shared CPU
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClipTrainConfig.{name} must be positive")
        if self.lr <= 0 or self.max_minutes <= 0:
            raise ValueError("ClipTrainConfig.lr and max_minutes must be positive")


def train_clip(config: ClipTrainConfig, log=print) -> ShapesClipModel:
    """Contrastive training on freshly drawn pictures of the training split only."""
    torch.manual_seed(config.seed)
    model = ShapesClipModel()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng([config.seed, 7])
    budget = Budget(config.steps, config.max_minutes)
    model.train()
    for step in range(config.steps):
        budget.set_lr(opt, config.lr, step)
        scenes = world.sample_scenes(config.batch_size, rng, "train")
        images = world.draw_batch(scenes, seed=int(rng.integers(2**31)))
        loss = contrastive_loss(model, images, [s.caption for s in scenes])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stop = budget.stop(step, "clip", log)
        if step % 100 == 0 or stop:
            log(f"clip step {step}: loss {loss.item():.3f} (progress {budget.progress(step):.2f})")
        if stop:
            break
    return model.eval()


@torch.no_grad()
def retrieval_accuracy(model: ShapesClipModel, images: Tensor, scenes: list[world.Scene]) -> dict[str, float]:
    """Top-1 caption retrieval among all 216 captions of the world, and per-attribute accuracy of the pick."""
    candidates = world.all_scenes()
    txt = model.encode_text([s.caption for s in candidates])
    pick = (model.encode_images(images) @ txt.T).argmax(-1).tolist()
    chosen = [candidates[i] for i in pick]
    n = len(scenes)
    return {
        "caption": sum(c == s for c, s in zip(chosen, scenes)) / n,
        "color": sum(c.color == s.color for c, s in zip(chosen, scenes)) / n,
        "shape": sum(c.shape == s.shape for c, s in zip(chosen, scenes)) / n,
        "position": sum(c.position == s.position for c, s in zip(chosen, scenes)) / n,
    }
