"""The preference set of the Shapes world (its HPDv3): pairs of the base generator's own samples.

For each pair, one training prompt is sampled twice by the base generator (different noise, one
guidance scale drawn per pair so that quality varies), both pictures are shown to the annotators
(:class:`rlkit.shapes.judges.AnnotatorJudge`) and the label records which one they prefer. The clean
latents of both samples are stored, so a latent reward model trains without decoding. A second,
independent labelling (``label_repeat``) measures the annotators' own consistency ceiling.

Columns: ``prompt`` (str), ``latents_a`` / ``latents_b`` (C, h, w float16, transformer latent space),
``label`` (1.0 when ``a`` is preferred), ``label_repeat`` (a second labelling), ``guidance`` (float).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from rlkit.models.sd3 import SD3Generator
from rlkit.shapes import world
from rlkit.shapes.judges import (AnnotatorConfig, AnnotatorJudge, Reading, annotator_utility, read_scenes,
                                 utility_of)
from rlkit.shapes.pretrain import sample_latents


MAX_TIE_ROUNDS = 8  # sampling rounds, in multiples of those needed, before ties are kept


@dataclass
class PreferenceConfig:
    num_pairs: int = 512
    num_steps: int = 12  # Euler steps per sample
    guidance_range: tuple[float, float] = (1.5, 5.0)  # per-pair CFG scale, uniform
    batch_size: int = 64  # pairs per sampling batch
    drop_ties: bool = True  # pairs the first labelling calls a tie (or valued exactly equally) are dropped
    # pairs perceived closer than 0.05 in utility (an eighth of template fit) are ties: most kept pairs then
    # differ in whether the shape is right, the difference a person would notice
    annotators: AnnotatorConfig = field(default_factory=lambda: AnnotatorConfig(tie_margin=0.05))
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("num_pairs", "num_steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PreferenceConfig.{name} must be positive")
        lo, hi = self.guidance_range
        if not 0 < lo <= hi:
            raise ValueError(f"PreferenceConfig.guidance_range must be 0 < low <= high, got {self.guidance_range}")


@torch.no_grad()
def build_preferences(generator: SD3Generator,
                      config: PreferenceConfig) -> tuple["datasets.Dataset", dict]:  # noqa: F821
    """Samples and labels pairs; returns the dataset and its statistics (ceiling, agreement, ties)."""
    import datasets

    annotators = AnnotatorJudge(config.annotators)
    rng = np.random.default_rng([config.seed, 3])
    noise_rng = torch.Generator().manual_seed(config.seed)
    label_rng = torch.Generator().manual_seed(config.seed + 1)
    repeat_rng = torch.Generator().manual_seed(config.seed + 2)
    train = world.train_prompts()
    rows: dict[str, list] = {k: [] for k in ("prompt", "latents_a", "latents_b", "label", "label_repeat", "guidance")}
    utilities_a, utilities_b = [], []
    ties = 0
    # a generator whose samples all look alike gives only ties: keep them after a few rounds, never loop forever
    tie_rounds = MAX_TIE_ROUNDS * -(-config.num_pairs // config.batch_size)
    rounds = 0
    while len(rows["prompt"]) < config.num_pairs:
        rounds += 1
        n = config.batch_size
        prompts = [train[i] for i in rng.integers(0, len(train), n)]
        guidance = torch.as_tensor(rng.uniform(*config.guidance_range, n), dtype=torch.float32)
        both = sample_latents(generator, prompts + prompts, noise_rng, config.num_steps,
                              torch.cat([guidance, guidance]))
        za, zb = both.chunk(2)
        images_a, images_b = generator.decode(za), generator.decode(zb)
        ua, ub = annotator_utility(images_a, prompts), annotator_utility(images_b, prompts)
        label, repeat = annotators.label(ua, ub, label_rng), annotators.label(ua, ub, repeat_rng)
        for i in range(n):
            tie = ua[i] == ub[i] or label[i] == 0.5
            if config.drop_ties and tie and rounds <= tie_rounds:
                ties += 1
                continue
            if len(rows["prompt"]) == config.num_pairs:
                break
            rows["prompt"].append(prompts[i])
            rows["latents_a"].append(za[i].half().cpu().numpy())
            rows["latents_b"].append(zb[i].half().cpu().numpy())
            rows["label"].append(float(label[i]))
            rows["label_repeat"].append(float(repeat[i]))
            rows["guidance"].append(float(guidance[i]))
            utilities_a.append(float(ua[i]))
            utilities_b.append(float(ub[i]))
    shape = tuple(rows["latents_a"][0].shape)
    features = datasets.Features({
        "prompt": datasets.Value("string"),
        "latents_a": datasets.Array3D(shape=shape, dtype="float16"),
        "latents_b": datasets.Array3D(shape=shape, dtype="float16"),
        "label": datasets.Value("float32"),
        "label_repeat": datasets.Value("float32"),
        "guidance": datasets.Value("float32"),
    })
    dataset = datasets.Dataset.from_dict(rows, features=features)
    ua_t, ub_t = torch.tensor(utilities_a), torch.tensor(utilities_b)
    label_t, repeat_t = torch.tensor(rows["label"]), torch.tensor(rows["label_repeat"])
    stats = {
        "pairs": len(dataset),
        "ties_dropped": ties,
        # two labellings, measured; a tie in one of them against a decision in the other counts half
        "annotator_agreement": float(torch.where(label_t == repeat_t, 1.0,
                                                 0.5 * ((label_t == 0.5) | (repeat_t == 0.5)).float()).mean()),
        "annotator_ceiling": annotators.consistency_ceiling(ua_t, ub_t),  # the same, expected
        "label_accuracy": float((label_t == (ua_t > ub_t).float()).float().mean()),  # vs noise-free utility
        "ties_in_repeat": float((repeat_t == 0.5).float().mean()),
        "preferred_a": float(label_t.mean()),
    }
    return dataset, stats


DRAWN_CHANGES = {"shape": 0.5, "color": 0.25, "position": 0.25}  # which attribute a drawn pair's loser gets wrong


def _one_attribute_off(scene: world.Scene, rng: np.random.Generator, split: str = "train") -> world.Scene:
    """``scene`` with one attribute replaced by another value (shape half the time, colour or position else). For
    the training split the result is never a held-out combination: those pictures reach no training stage, not
    even as a loser."""
    attribute = rng.choice(list(DRAWN_CHANGES), p=list(DRAWN_CHANGES.values()))
    values = {"shape": world.SHAPES, "color": tuple(world.COLORS), "position": tuple(world.POSITIONS)}[attribute]
    current = getattr(scene, attribute)
    others = [replace(scene, **{attribute: v}) for v in values if v != current]
    if split == "train":
        others = [o for o in others if not world.is_heldout(o)]
    return others[rng.integers(0, len(others))]


DRAWN_SOURCE = "shapes:drawn"  # a pair source of the reward-model trainer: ``shapes:drawn:<pairs>[:<seed>]``
GENERATED_SOURCE = "shapes:generated"  # ``shapes:generated:<samples>[:<seed>]``


@torch.no_grad()
def drawn_pairs(generator: SD3Generator, num_pairs: int, seed: int = 0, annotators: AnnotatorConfig | None = None,
                batch_size: int = 256, split: str = "train") -> list["PreferencePair"]:  # noqa: F821
    """Pairs of drawn pictures that differ in one attribute: the prompt's picture and one that gets it wrong.

    These are the real pictures of the preference set (HPDv3 holds real photographs too): a reward model
    that sees only the base generator's soft blobs has few clean examples of what makes a scene right,
    and none of a wrong colour or position, which the base generator never draws. The loser has another
    shape half the time, another colour or position otherwise (:data:`DRAWN_CHANGES`); both sides share
    every jitter (size, colours, noise), so that attribute is the one thing to prefer. The annotators label
    them like the generated pairs, and pairs they call a tie are dropped. Pictures are drawn and encoded
    by ``generator``'s VAE on the fly, so they cost no storage: the pairs depend only on ``seed``. ``split``
    picks the scenes: ``train`` for training, ``heldout`` to evaluate on the combinations held out.
    """
    from rlkit.data import PreferencePair

    judge = AnnotatorJudge(annotators or PreferenceConfig().annotators)
    rng = np.random.default_rng([seed, 5])
    label_rng = torch.Generator().manual_seed(seed + 3)
    pairs: list[PreferencePair] = []
    batch = 0
    while len(pairs) < num_pairs:
        scenes = world.sample_scenes(batch_size, rng, split)
        others = [_one_attribute_off(s, rng, split) for s in scenes]
        picture_seed = seed * 1_000_003 + batch  # one seed for both sides: the same jitter
        batch += 1
        right, wrong = world.draw_batch(scenes, picture_seed), world.draw_batch(others, picture_seed)
        prompts = [s.caption for s in scenes]
        label = judge.label(annotator_utility(right, prompts), annotator_utility(wrong, prompts), label_rng)
        z_right = generator.encode(right.to(generator.device)).cpu()
        z_wrong = generator.encode(wrong.to(generator.device)).cpu()
        shape = tuple(z_right.shape[1:])
        for i in range(batch_size):
            if label[i] == 0.5 or len(pairs) == num_pairs:
                continue
            pairs.append(PreferencePair(prompts[i], z_right[i], z_wrong[i], "latent", float(label[i]),
                                        file=f"{DRAWN_SOURCE}:{num_pairs}:{seed}", row=len(pairs),
                                        shapes=(shape, shape),
                                        meta={"wrong": others[i].caption, "picture": (picture_seed, i)}))
    return pairs


GENERATED_GROUP = 32  # samples of one prompt per group of ``shapes:generated``: C(32, 2) = 496 pairs to label


@dataclass
class SampleGroup:
    """Samples of one training prompt by the base generator, and what the analytic reader sees in them."""

    start: int  # index of the first sample in the whole stream
    prompt: str
    guidance: float
    latents: Tensor  # (n, C, h, w) on the CPU
    reading: Reading  # of the decoded samples, against the prompt


@torch.no_grad()
def sample_groups(generator: SD3Generator, num_samples: int, seed: int = 0, group_size: int = GENERATED_GROUP,
                  num_steps: int = PreferenceConfig.num_steps,
                  guidance_range: tuple[float, float] = PreferenceConfig.guidance_range) -> Iterator[SampleGroup]:
    """``num_samples`` base-generator samples in groups of ``group_size`` of one training prompt each.

    Training prompts are taken in a seeded order, one guidance scale drawn per group; the stream depends only on
    ``seed``. Shared by :func:`generated_pairs` and the reward report's shortcut check.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    rng = np.random.default_rng([seed, 7])
    noise_rng = torch.Generator().manual_seed(seed + 5)
    train = world.train_prompts()
    order = rng.permutation(len(train))
    for group, start in enumerate(range(0, num_samples, group_size)):
        n = min(group_size, num_samples - start)
        prompt = train[order[group % len(train)]]
        guidance = float(rng.uniform(*guidance_range))
        latents = sample_latents(generator, [prompt] * n, noise_rng, num_steps, guidance)
        reading = read_scenes(generator.decode(latents), [prompt] * n)
        yield SampleGroup(start, prompt, guidance, latents.cpu(), reading)


@dataclass
class LabelledSamples:
    """Base-generator samples in groups of one prompt, and the within-prompt pairs the annotators decided.

    What :func:`generated_pairs` returns, kept in a form that can be stored: every sample's latent once, and each
    pair as two indices into them.
    """

    latents: Tensor  # (N, C, h, w), samples in stream order
    sample_group: Tensor  # (N,) the group of each sample
    prompts: list[str]  # per group
    guidance: Tensor  # (G,) per group
    winners: Tensor  # (P,) sample indices
    losers: Tensor  # (P,)

    def pairs(self, source: str) -> list["PreferencePair"]:  # noqa: F821
        from rlkit.data import PreferencePair

        shape = tuple(self.latents.shape[1:])
        out = []
        for winner, loser in zip(self.winners.tolist(), self.losers.tolist()):
            group = int(self.sample_group[winner])
            out.append(PreferencePair(self.prompts[group], self.latents[winner], self.latents[loser], "latent", 1.0,
                                      file=source, row=len(out), shapes=(shape, shape),
                                      meta={"samples": (winner, loser), "guidance": float(self.guidance[group])}))
        return out

    def save(self, path: Path, key: str) -> None:
        from safetensors.torch import save

        from rlkit.runtime.checkpoint import write_bytes_atomic

        tensors = {"latents": self.latents.contiguous(), "sample_group": self.sample_group, "guidance": self.guidance,
                   "winners": self.winners, "losers": self.losers}
        write_bytes_atomic(path, save(tensors, metadata={"key": key, "prompts": json.dumps(self.prompts)}))

    @classmethod
    def load(cls, path: Path, key: str) -> "LabelledSamples | None":
        """The samples stored at ``path``, or None when there are none or they were made with another ``key``."""
        from safetensors import safe_open

        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return cls(prompts=json.loads(meta["prompts"]), **tensors)


def generator_fingerprint(generator: SD3Generator) -> str:
    """A hash of the weights that make and read the samples (transformer, VAE, text encoders)."""
    digest = hashlib.sha256()
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(generator.pipeline, part, None)
        for name, tensor in sorted((module.state_dict() if module is not None else {}).items()):
            digest.update(f"{part}.{name}".encode())
            digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:20]


def label_generated(generator: SD3Generator, num_samples: int, seed: int, judge: AnnotatorJudge,
                    group_size: int, num_steps: int, guidance_range: tuple[float, float], progress: bool,
                    ) -> LabelledSamples:
    """Samples :func:`sample_groups` and keeps every within-prompt pair the annotators decide."""
    from tqdm.auto import tqdm

    label_rng = torch.Generator().manual_seed(seed + 6)
    latents, sample_group, prompts, guidance, winners, losers = [], [], [], [], [], []
    bar = tqdm(total=num_samples, desc=f"{GENERATED_SOURCE}:{num_samples}:{seed}", unit="sample",
               disable=not progress)
    for group in sample_groups(generator, num_samples, seed, group_size, num_steps, guidance_range):
        n = len(group.latents)
        utility = utility_of(group.reading)
        first, second = torch.triu_indices(n, n, offset=1)
        labels = judge.label(utility[first], utility[second], label_rng)
        for i, j, label in zip(first.tolist(), second.tolist(), labels.tolist()):
            if label == 0.5 or utility[i] == utility[j]:
                continue
            winner, loser = (i, j) if label == 1.0 else (j, i)
            winners.append(group.start + winner)
            losers.append(group.start + loser)
        sample_group += [len(prompts)] * n
        latents.append(group.latents)
        prompts.append(group.prompt)
        guidance.append(group.guidance)
        bar.update(n)
        bar.set_postfix(pairs=len(winners))
    bar.close()
    return LabelledSamples(torch.cat(latents), torch.tensor(sample_group, dtype=torch.long), prompts,
                           torch.tensor(guidance, dtype=torch.float64), torch.tensor(winners, dtype=torch.long),
                           torch.tensor(losers, dtype=torch.long))


def generated_pairs(generator: SD3Generator, num_samples: int, seed: int = 0, annotators: AnnotatorConfig | None = None,
                    group_size: int = GENERATED_GROUP, num_steps: int = PreferenceConfig.num_steps,
                    guidance_range: tuple[float, float] = PreferenceConfig.guidance_range, progress: bool = True,
                    cache_dir: str | Path | None = None) -> list["PreferencePair"]:  # noqa: F821
    """Every within-prompt pair of many base-generator samples that the annotators do not call a tie.

    The stored preference set holds a few hundred pairs, and a few hundred are too few to learn which of two
    soft blobs is the better triangle (a small CNN fits them and ranks held-out pairs at chance). Labelling
    all pairs of a group of samples of one prompt, as HPDv3 ranks several images per prompt, turns ``n``
    samples into about ``n (group_size - 1) / 2`` comparisons, of which the annotators decide about a third.
    The samples come from :func:`sample_groups`, on the fly (``num_samples / 25`` seconds on two CPU cores), so
    the pairs cost no storage and depend only on ``seed``.

    ``cache_dir``: the labelled samples are stored there and reused by a later call with the same arguments and
    the same generator weights, so that several reward models (an ablation, a sweep) train on one sampling.
    """
    annotators = annotators or PreferenceConfig().annotators
    source = f"{GENERATED_SOURCE}:{num_samples}:{seed}"
    path = key = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"generated_{num_samples}_{seed}.safetensors"
        key = json.dumps({"num_samples": num_samples, "seed": seed, "annotators": asdict(annotators),
                          "group_size": group_size, "num_steps": num_steps, "guidance_range": list(guidance_range),
                          "generator": generator_fingerprint(generator)}, sort_keys=True)
        stored = LabelledSamples.load(path, key)
        if stored is not None:
            return stored.pairs(source)
    samples = label_generated(generator, num_samples, seed, AnnotatorJudge(annotators), group_size, num_steps,
                              guidance_range, progress)
    if path is not None:
        samples.save(path, key)
    return samples.pairs(source)


SHAPES_SOURCES = {DRAWN_SOURCE: "pairs", GENERATED_SOURCE: "samples"}  # prefix -> what its count counts


def is_shapes_source(source: str) -> bool:
    return source.startswith("shapes:")


def parse_shapes_source(source: str) -> tuple[str, int, int]:
    """``shapes:drawn:<pairs>[:<seed>]`` or ``shapes:generated:<samples>[:<seed>]`` -> ``(prefix, count, seed)``."""
    prefix = next((p for p in SHAPES_SOURCES if source == p or source.startswith(p + ":")), None)
    if prefix is None:
        raise ValueError(f"pair source {source!r}: expected one of " + ", ".join(
            f"{p}:<{what}>[:<seed>]" for p, what in SHAPES_SOURCES.items()))
    syntax = f"{prefix}:<{SHAPES_SOURCES[prefix]}>[:<seed>]"
    parts = source[len(prefix):].lstrip(":").split(":")
    try:
        count, seed = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except (ValueError, IndexError):
        raise ValueError(f"pair source {source!r}: expected {syntax}, e.g. {prefix}:4096") from None
    if count <= 0 or len(parts) > 2:
        raise ValueError(f"pair source {source!r}: expected {syntax} with {SHAPES_SOURCES[prefix]} > 0")
    return prefix, count, seed


def shapes_source_pairs(generator: SD3Generator, source: str,
                        cache_dir: str | Path | None = None) -> list["PreferencePair"]:  # noqa: F821
    """The pairs of a ``shapes:drawn`` or ``shapes:generated`` source, made with ``generator`` (its VAE).

    ``cache_dir`` keeps a ``shapes:generated`` source's labelled samples for the next call (drawn pairs are cheap).
    """
    prefix, count, seed = parse_shapes_source(source)
    if prefix == GENERATED_SOURCE:
        return generated_pairs(generator, count, seed, cache_dir=cache_dir)
    return drawn_pairs(generator, count, seed)


def save_preferences(dataset, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path))
    return path


def load_preferences(path: str | Path | None = None):
    """The preference pairs as a ``datasets.Dataset`` (default: the set shipped with rlkit)."""
    import datasets

    from rlkit.shapes.judges import ASSETS_DIR

    source = Path(path or ASSETS_DIR / "preferences" / "train.parquet")
    if not source.is_file():
        raise FileNotFoundError(f"no Shapes preference set at {str(source)!r}; "
                                f"rebuild it with `rlkit shapes build {ASSETS_DIR}`")
    return datasets.Dataset.from_parquet(str(source))
