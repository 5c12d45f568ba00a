"""Pairs -> tensors: one :class:`PairBatch` per step, all items of a batch of one shape.

``BucketBatchSampler`` draws global batches from one shape bucket at a time (the trainer gives each
process its slice), so a batch never mixes latent sizes; ``collate_pairs`` checks anyway and names the
file, row and column of a pair that does not fit.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Iterator, Sequence

import torch
from torch import Tensor

from rlkit.data.buckets import resize_to_bucket
from rlkit.data.pairs import PreferencePair, image_to_tensor, load_image, load_latent, open_image
from rlkit.runtime.seeding import make_generator


@dataclass
class PairBatch:
    prompts: list[str]
    chosen: Tensor  # (B, C, h, w) latents, or (B, 3, H, W) images in [0, 1]
    rejected: Tensor  # same shape as chosen
    labels: Tensor  # (B,) probability that chosen is preferred (1, or 0.5 for a kept tie)
    kind: str  # "latent" | "image"
    pairs: list[PreferencePair]

    def __len__(self) -> int:
        return len(self.prompts)


def load_side(pair: PreferencePair, side: int, image_size: tuple[int, int] | None = None) -> Tensor:
    """One side of a pair as a tensor; images optionally resized/centre-cropped to ``image_size`` (h, w)."""
    if pair.kind == "latent":
        return load_latent(pair, side)
    image = load_image(pair, side)
    if image_size is not None:
        image = resize_to_bucket(image, image_size)
    return image_to_tensor(image)


def collate_pairs(pairs: Sequence[PreferencePair], image_size: tuple[int, int] | None = None) -> PairBatch:
    """Loads and stacks a batch; every tensor must have the first pair's shape."""
    if not pairs:
        raise ValueError("collate_pairs: empty batch")
    kinds = {p.kind for p in pairs}
    if len(kinds) > 1:
        odd = next(p for p in pairs if p.kind != pairs[0].kind)
        raise odd.error(f"a batch mixes {pairs[0].kind}s and {odd.kind}s", 0)
    sides: list[list[Tensor]] = [[], []]
    for pair in pairs:
        for side in (0, 1):
            tensor = load_side(pair, side, image_size)
            ref = sides[0][0] if sides[0] else tensor
            if tensor.shape != ref.shape:
                first = pairs[0]
                raise pair.error(
                    f"{pair.kind} shape {tuple(tensor.shape)} differs from {tuple(ref.shape)} of the batch's first "
                    f"pair ({first.file}, row {first.row}); batch by shape (BucketBatchSampler) or re-cache into "
                    f"shared buckets", side)
            sides[side].append(tensor)
    return PairBatch(
        prompts=[p.prompt for p in pairs],
        chosen=torch.stack(sides[0]),
        rejected=torch.stack(sides[1]),
        labels=torch.tensor([p.label for p in pairs], dtype=torch.float32),
        kind=pairs[0].kind,
        pairs=list(pairs),
    )


def shape_key(pair: PreferencePair) -> Hashable:
    """What decides batch compatibility: the latent shape, or the image size ``(h, w)`` of both sides."""
    if pair.kind == "latent":
        if pair.shapes[0] is not None and pair.shapes[1] is not None:
            return (pair.shapes[0], pair.shapes[1])
        return (tuple(load_latent(pair, 0).shape), tuple(load_latent(pair, 1).shape))
    sizes = []
    for side in (0, 1):
        image = open_image(pair, side)
        sizes.append((image.height, image.width))
    return tuple(sizes)


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Global batches of indices that share a key, reshuffled each epoch from ``seed`` and the epoch.

    Each bucket contributes ``len // batch_size`` full batches (``drop_last``) or one more partial batch;
    the order of batches across buckets is shuffled too. Every process builds the same sequence and takes
    its own slice of each batch, so the global batch does not depend on the number of processes.
    """

    def __init__(self, keys: Sequence[Hashable], batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        if batch_size <= 0:
            raise ValueError(f"BucketBatchSampler.batch_size: must be > 0, got {batch_size}")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.buckets: dict[Hashable, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            self.buckets[key].append(i)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        gen = make_generator(self.seed, "bucket-batches", self.epoch)
        batches: list[list[int]] = []
        for key in sorted(self.buckets, key=repr):
            idx = self.buckets[key]
            if self.shuffle:
                idx = [idx[i] for i in torch.randperm(len(idx), generator=gen).tolist()]
            stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
            batches.extend(idx[i:i + self.batch_size] for i in range(0, stop, self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def left_out(self) -> dict[Hashable, tuple[int, int]]:
        """``{key: (left out, of)}`` for the buckets that an epoch does not cover whole under ``drop_last``: the
        remainder of a full batch sits out each epoch (another one each time), and a bucket smaller than a batch
        is never seen."""
        if not self.drop_last:
            return {}
        return {key: (len(idx) % self.batch_size, len(idx)) for key, idx in self.buckets.items()
                if len(idx) % self.batch_size}

    def __len__(self) -> int:
        n = 0
        for idx in self.buckets.values():
            n += len(idx) // self.batch_size if self.drop_last else -(-len(idx) // self.batch_size)
        return n
