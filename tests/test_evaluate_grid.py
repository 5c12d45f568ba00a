"""The evaluation grid shows many prompts, not the first prompt's images only."""

from __future__ import annotations

import pytest
from PIL import Image

from rlkit.evaluate import Evaluator, grid_indices


@pytest.mark.parametrize("prompts, per_prompt, limit, expected", [
    (3, 2, 4, [0, 2, 4, 1]),  # every prompt's first image, then the second ones
    (3, 2, 10, [0, 2, 4, 1, 3, 5]),  # never more than there are samples
    (4, 1, 2, [0, 1]),
    (2, 3, 0, []),
])
def test_grid_takes_each_prompts_first_image_before_any_second(prompts, per_prompt, limit, expected):
    assert grid_indices(prompts, per_prompt, limit) == expected


def test_evaluator_grid_holds_the_picked_samples(tiny_generator, tmp_path, monkeypatch):
    import rlkit.runtime.images as images

    shown = {}

    def record(batch, path, captions=None, **kwargs):
        shown.update(n=batch.shape[0], captions=list(captions))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(path)

    monkeypatch.setattr(images, "save_image_grid", record)
    prompts = ["a red circle at the top", "a blue square at the left", "a green cross at the center"]
    evaluator = Evaluator(prompts, images_per_prompt=2, seed=0, num_steps=2, guidance_scale=1.0, golden={},
                          proxy={}, batch_size=4, resolution=32, grid_images=3)
    result = evaluator.run(tiny_generator, step=5, out_dir=tmp_path)
    assert result.images_path == tmp_path / "samples" / "step_000005.png" and result.images_path.is_file()
    assert shown == {"n": 3, "captions": prompts}
