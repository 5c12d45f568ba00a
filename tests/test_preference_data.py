"""Preference data: layouts, ranked expansion, latents, errors that name file/row/column, buckets, caching."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rlkit.data import (
    BucketBatchSampler,
    BucketConfig,
    LoadOptions,
    PreferenceDataError,
    collate_pairs,
    load_pairs,
    resize_to_bucket,
    shape_key,
)


def png(path, size, color):
    """A solid image of ``size`` (h, w); returns the path."""
    Image.new("RGB", (size[1], size[0]), color).save(path)
    return path


def png_bytes(size, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), color).save(buf, format="PNG")
    return buf.getvalue()


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32))
    return buf.getvalue()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------------------- layouts

def test_hpdv3_layout_first_image_is_chosen_and_paths_resolve_next_to_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    png(tmp_path / "images/a.png", (8, 8), (255, 0, 0))
    png(tmp_path / "images/b.png", (8, 8), (0, 0, 255))
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "a red thing", "path1": "images/a.png", "path2": "images/b.png", "model1": "m1", "model2": "m2",
         "choice_dist": [3, 1], "confidence": 0.75},
    ])
    pairs = load_pairs(data)
    assert len(pairs) == 1
    p = pairs[0]
    assert (p.prompt, p.kind, p.label, p.row) == ("a red thing", "image", 1.0, 0)
    assert p.meta == {"model1": "m1", "model2": "m2", "choice_dist": [3, 1], "confidence": 0.75}
    batch = collate_pairs(pairs)
    assert batch.chosen.shape == (1, 3, 8, 8)
    assert torch.allclose(batch.chosen[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # red = path1 = chosen
    assert torch.allclose(batch.rejected[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))


def test_hpdv3_json_list_with_image_root(tmp_path):
    root = tmp_path / "meta"
    root.mkdir()
    png(root / "x.png", (4, 4), (0, 255, 0))
    png(root / "y.png", (4, 4), (0, 0, 0))
    data = tmp_path / "test.json"
    data.write_text(json.dumps([{"prompt": "p", "path1": "x.png", "path2": "y.png"}]))
    batch = collate_pairs(load_pairs(data, image_root=str(root)))
    assert batch.chosen[0, 1].mean() == 1.0 and batch.rejected.sum() == 0


def test_a_label_column_the_options_name_is_read_in_every_layout_and_required(tmp_path):
    """A mapped label is never ignored: the latents layout reads it (a 0 swaps the sides), a row without it is an
    error naming the column, and a label out of range names its column."""
    z1, z2 = np.ones((2, 3, 4), dtype=np.float32), np.zeros((2, 3, 4), dtype=np.float32)
    rows = {"prompt": ["a"], "latent1": [npy(z1)], "latent2": [npy(z2)], "latent1_shape": [[2, 3, 4]],
            "latent2_shape": [[2, 3, 4]], "pref": [0.0]}
    pq.write_table(pa.table(rows), tmp_path / "lat.parquet")
    (pair,) = load_pairs(tmp_path / "lat.parquet", columns={"label": "pref"})
    assert torch.equal(collate_pairs([pair]).chosen[0], torch.from_numpy(z2))  # latent2 preferred
    pq.write_table(pa.table({**rows, "pref": [1.5]}), tmp_path / "lat.parquet")
    with pytest.raises(PreferenceDataError, match=r"row 0, column 'pref': label must lie in \[0, 1\], got 1.5"):
        load_pairs(tmp_path / "lat.parquet", columns={"label": "pref"})
    data = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "chosen": "x.png", "rejected": "y.png", "pref": 0.0}])
    with pytest.raises(PreferenceDataError, match=r"row 0, column 'preference': no label in this row"):
        load_pairs(data, columns={"label": "preference"})
    (pair,) = load_pairs(data, columns={"label": "pref"})
    assert (pair.chosen, pair.rejected) == ("y.png", "x.png")


def test_generic_parquet_with_column_mapping_bytes_images_and_labels(tmp_path):
    table = pa.table({
        "caption": ["one", "two"],
        "win": [png_bytes((4, 4), (255, 255, 255)), png_bytes((4, 4), (10, 10, 10))],
        "lose": [png_bytes((4, 4), (0, 0, 0)), png_bytes((4, 4), (20, 20, 20))],
        "p": [1.0, 0.5],
    })
    pq.write_table(table, tmp_path / "d.parquet")
    pairs = load_pairs(tmp_path / "d.parquet",
                       columns={"prompt": "caption", "chosen": "win", "rejected": "lose", "label": "p"})
    assert [p.prompt for p in pairs] == ["one", "two"]
    assert [p.label for p in pairs] == [1.0, 0.5]
    assert pairs[1].is_tie and not pairs[0].is_tie
    batch = collate_pairs(pairs)
    assert batch.chosen[0].min() == 1.0 and batch.rejected[0].max() == 0.0
    assert torch.equal(batch.labels, torch.tensor([1.0, 0.5]))


def test_ranked_sets_expand_into_all_ordered_pairs_with_configurable_ties(tmp_path):
    # ImageReward / HPDv2 style: lower rank is better; c and d tie
    record = {"prompt": "p", "image_path": ["a", "b", "c", "d"], "rank": [1, 3, 2, 2]}
    data = write_jsonl(tmp_path / "r.jsonl", [record])
    skip = load_pairs(data)
    got = {(p.chosen, p.rejected) for p in skip}
    assert got == {("a", "b"), ("a", "c"), ("a", "d"), ("c", "b"), ("d", "b")}
    assert all(p.label == 1.0 for p in skip)
    assert {p.columns for p in skip if p.chosen == "c"} == {("image_path[2]", "image_path[1]")}
    keep = load_pairs(data, ties="keep")
    assert len(keep) == 6
    ties = [p for p in keep if p.is_tie]
    assert [(p.chosen, p.rejected, p.label) for p in ties] == [("c", "d", 0.5)]


def test_human_preference_column_means_higher_is_better(tmp_path):
    data = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "p", "image_path": ["x", "y"], "human_preference": [0, 1]}])
    (pair,) = load_pairs(data)
    assert (pair.chosen, pair.rejected) == ("y", "x")
    (flipped,) = load_pairs(data, higher_is_better=False)
    assert (flipped.chosen, flipped.rejected) == ("x", "y")


def test_max_pairs_per_prompt_caps_each_prompt_reproducibly(tmp_path):
    records = [{"prompt": "p", "image_path": [f"i{k}" for k in range(5)], "rank": list(range(5))},
               {"prompt": "q", "image_path": ["u", "v"], "rank": [1, 2]}]
    data = write_jsonl(tmp_path / "r.jsonl", records)
    assert len(load_pairs(data)) == 10 + 1
    capped = load_pairs(data, max_pairs_per_prompt=3, seed=7)
    assert sum(p.prompt == "p" for p in capped) == 3 and sum(p.prompt == "q" for p in capped) == 1
    again = load_pairs(data, max_pairs_per_prompt=3, seed=7)
    assert [(p.chosen, p.rejected) for p in capped] == [(p.chosen, p.rejected) for p in again]


def test_latent_layout_reads_npy_bytes_raw_bytes_with_shape_and_lists(tmp_path):
    z1 = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    z2 = -z1
    table = pa.table({
        "prompt": ["a", "b"],
        "latent1": [npy(z1), z1.tobytes()],
        "latent2": [npy(z2), z2.tobytes()],
        "latent1_shape": [[2, 3, 4], [2, 3, 4]],
        "latent2_shape": [[2, 3, 4], [2, 3, 4]],
    })
    pq.write_table(table, tmp_path / "lat.parquet")
    pairs = load_pairs(tmp_path / "lat.parquet")
    assert all(p.kind == "latent" for p in pairs)
    batch = collate_pairs(pairs)
    assert batch.kind == "latent" and batch.chosen.shape == (2, 2, 3, 4)
    assert torch.equal(batch.chosen[0], torch.from_numpy(z1)) and torch.equal(batch.chosen[1], torch.from_numpy(z1))
    assert torch.equal(batch.rejected[1], torch.from_numpy(z2))
    # generic layout with nested-list latents
    data = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "c", "chosen": z1.tolist(), "rejected": z2.tolist()}])
    (p,) = load_pairs(data)
    assert p.kind == "latent" and torch.equal(collate_pairs([p]).rejected[0], torch.from_numpy(z2))


def test_a_parquet_files_latents_stay_on_disk_until_a_batch_reads_them(tmp_path):
    """The index holds references to the latent cells, not their bytes; they are read a row group at a time,
    the same values as an eager read, also in a process the pairs were pickled to."""
    import pickle

    from rlkit.data.pairs import ParquetCell

    latents = [np.full((2, 3, 4), i, dtype=np.float32) for i in range(10)]
    table = pa.table({"prompt": [f"p{i}" for i in range(5)],
                      "latent1": [npy(latents[2 * i]) for i in range(5)],
                      "latent2": [npy(latents[2 * i + 1]) for i in range(5)],
                      "latent1_shape": [[2, 3, 4]] * 5, "latent2_shape": [[2, 3, 4]] * 5})
    pq.write_table(table, tmp_path / "lat.parquet", row_group_size=2)  # row groups of 2, 2 and 1 rows
    pairs = load_pairs(tmp_path / "lat.parquet")
    assert [p.row for p in pairs] == [0, 1, 2, 3, 4] and all(isinstance(p.chosen, ParquetCell) for p in pairs)
    assert [(p.chosen.group, p.chosen.index) for p in pairs] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    cells = pairs[0].chosen.cells
    assert not cells._groups  # nothing read yet
    batch = collate_pairs(pairs[3:])
    assert batch.chosen[:, 0, 0, 0].tolist() == [6.0, 8.0] and batch.rejected[:, 0, 0, 0].tolist() == [7.0, 9.0]
    assert sorted(cells._groups) == [(1, "latent1"), (1, "latent2"), (2, "latent1"), (2, "latent2")]
    cells.max_bytes = 1  # a memory budget below one row group's column keeps only the one being read
    collate_pairs(pairs[:1])
    assert list(cells._groups) == [(0, "latent2")]
    copy = pickle.loads(pickle.dumps(pairs[1]))
    assert collate_pairs([copy]).rejected[0, 0, 0, 0].item() == 3.0
    elsewhere = pickle.loads(pickle.dumps(pairs[0]))  # a process that has not opened the file yet
    (tmp_path / "lat.parquet").unlink()
    with pytest.raises(PreferenceDataError, match=r"row 0, column 'latent1': unreadable latent"):
        collate_pairs([elsewhere])


def test_hub_style_dataset_with_image_feature(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({
        "prompt": ["p"], "chosen": [Image.new("RGB", (4, 4), (255, 0, 0))],
        "rejected": [Image.new("RGB", (4, 4), (0, 255, 0))],
    }).cast_column("chosen", datasets.Image()).cast_column("rejected", datasets.Image())
    folder = tmp_path / "hub"
    folder.mkdir()
    ds.to_parquet(str(folder / "train.parquet"))
    pairs = load_pairs(f"hf:{folder}")
    assert pairs[0].file.startswith("hf:") and pairs[0].kind == "image"
    assert isinstance(pairs[0].chosen, dict) and pairs[0].chosen["bytes"]  # kept encoded until a batch needs it
    batch = collate_pairs(pairs)
    assert batch.chosen[0, 0].mean() == 1.0 and batch.rejected[0, 1].mean() == 1.0


# ------------------------------------------------------------------------------------------------ errors

def test_missing_column_names_file_row_and_column(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "path1": "a.png", "path2": "b.png"},
        {"prompt": "no second image", "path1": "a.png"},
    ])
    with pytest.raises(PreferenceDataError) as exc:
        load_pairs(data)
    e = exc.value
    assert (e.file, e.row, e.column) == (str(data), 1, "path2")
    assert str(data) in str(e) and "row 1" in str(e) and "'path2'" in str(e)


def test_a_jsonl_row_is_its_line_for_data_and_syntax_errors_alike_and_a_bad_label_is_named(tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"prompt": "a", "path1": "x", "path2": "y"}\n\n{"prompt": "b", "path1": "x"}\n')
    with pytest.raises(PreferenceDataError) as exc:
        load_pairs(blank)
    assert (exc.value.row, exc.value.column) == (2, "path2")
    blank.write_text('{"prompt": "a", "path1": "x", "path2": "y"}\n\n{oops\n')
    with pytest.raises(PreferenceDataError) as exc:
        load_pairs(blank)
    assert exc.value.row == 2
    label = write_jsonl(tmp_path / "label.jsonl", [{"prompt": "a", "chosen": "x.png", "rejected": "y.png",
                                                    "label": "abc"}])
    with pytest.raises(PreferenceDataError, match=r"row 0, column 'label': expected a number .*got 'abc'"):
        load_pairs(label)


def test_a_folder_of_several_splits_is_refused_and_one_of_shards_is_read_whole(tmp_path):
    record = {"prompt": "a", "path1": "x.png", "path2": "y.png"}
    hpdv3 = tmp_path / "hpdv3"
    hpdv3.mkdir()
    for split in ("train", "test", "all"):
        (hpdv3 / f"{split}.json").write_text(json.dumps([record]))
    with pytest.raises(PreferenceDataError, match=r"holds the splits \['all', 'test', 'train'\]; name the file"):
        load_pairs(hpdv3)
    assert len(load_pairs(hpdv3 / "train.json")) == 1
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        write_jsonl(shards / f"train-0000{i}-of-00002.jsonl", [record])
    assert len(load_pairs(shards)) == 2


def test_unknown_layout_and_bad_json_name_the_file(tmp_path):
    data = write_jsonl(tmp_path / "odd.jsonl", [{"text": "x", "img": "y"}])
    with pytest.raises(PreferenceDataError, match="cannot tell the layout"):
        load_pairs(data)
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"prompt": "a", "path1": "x", "path2": "y"}\n{not json\n')
    with pytest.raises(PreferenceDataError) as exc:
        load_pairs(bad)
    assert exc.value.row == 1 and str(bad) in str(exc.value)


def test_unreadable_image_names_file_row_and_column(tmp_path):
    png(tmp_path / "good.png", (4, 4), (1, 2, 3))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "a", "path1": "good.png", "path2": "good.png"},
        {"prompt": "b", "path1": "good.png", "path2": "broken.png"},
        {"prompt": "c", "path1": "missing.png", "path2": "good.png"},
    ])
    pairs = load_pairs(data)
    with pytest.raises(PreferenceDataError) as exc:
        collate_pairs(pairs[:2])
    assert (exc.value.file, exc.value.row, exc.value.column) == (str(data), 1, "path2")
    with pytest.raises(PreferenceDataError) as exc:
        collate_pairs(pairs[2:])
    assert (exc.value.row, exc.value.column) == (2, "path1") and "unreadable image" in str(exc.value)


def test_mismatched_latent_shapes_in_one_batch_name_the_odd_pair(tmp_path):
    table = pa.table({
        "prompt": ["a", "b", "c"],
        "latent1": [npy(np.zeros((4, 8, 8))), npy(np.zeros((4, 8, 8))), npy(np.zeros((4, 8, 6)))],
        "latent2": [npy(np.zeros((4, 8, 8))), npy(np.zeros((4, 8, 8))), npy(np.zeros((4, 8, 6)))],
    })
    pq.write_table(table, tmp_path / "mixed.parquet")
    pairs = load_pairs(tmp_path / "mixed.parquet")
    with pytest.raises(PreferenceDataError) as exc:
        collate_pairs(pairs)
    assert (exc.value.row, exc.value.column) == (2, "latent1")
    assert "(4, 8, 6)" in str(exc.value) and "(4, 8, 8)" in str(exc.value)
    # grouping by shape avoids it: every batch of the sampler collates
    sampler = BucketBatchSampler([shape_key(p) for p in pairs], batch_size=2, drop_last=False)
    for idx in sampler:
        collate_pairs([pairs[i] for i in idx])


def test_latent_values_that_contradict_their_shape_column(tmp_path):
    table = pa.table({"prompt": ["a"], "latent1": [npy(np.zeros((2, 2, 2)))], "latent2": [npy(np.zeros((2, 2, 2)))],
                      "latent1_shape": [[2, 2, 3]], "latent2_shape": [[2, 2, 2]]})
    pq.write_table(table, tmp_path / "s.parquet")
    with pytest.raises(PreferenceDataError, match="8 values but its shape column says"):
        collate_pairs(load_pairs(tmp_path / "s.parquet"))


def test_load_options_are_validated_with_the_field_name():
    with pytest.raises(ValueError, match="LoadOptions.ties"):
        LoadOptions(ties="maybe")
    with pytest.raises(ValueError, match="LoadOptions.max_pairs_per_prompt"):
        LoadOptions(max_pairs_per_prompt=0)
    with pytest.raises(ValueError, match="LoadOptions.columns"):
        LoadOptions(columns={"winner": "x"})


# ------------------------------------------------------------------------------------------------ buckets

def test_release_buckets_assign_by_aspect_then_area_and_drop_small_images():
    cfg = BucketConfig()
    assert cfg.assign(1200, 800) == (1248, 832)  # 3:2, closest area among (1248,832) and (1344,896)
    assert cfg.assign(1024, 1024) == (1024, 1024)
    assert cfg.assign(600, 600) == (512, 512)
    assert cfg.assign(200, 200) is None  # under 256^2
    assert cfg.assign(1000, 300) is None  # no bucket of that aspect
    assert BucketConfig(min_pixels=0).assign(200, 200) == (256, 256)
    # a pair shares the larger bucket when both aspects fit it (the release scales the smaller image up)
    assert cfg.assign_pair((1024, 1024), (600, 600)) == (1024, 1024)
    assert cfg.assign_pair((512, 512), (1024, 1024)) == (1024, 1024)
    assert cfg.assign_pair((1344, 896), (1248, 832)) == (1344, 896)
    assert cfg.assign_pair((1024, 1024), (1200, 800)) is None
    with pytest.raises(ValueError, match="BucketConfig.sizes"):
        BucketConfig(sizes=[(100, 64)], divisible=16)


def test_resize_to_bucket_covers_and_centre_crops():
    image = Image.new("RGB", (40, 20), (0, 0, 0))  # w=40, h=20
    image.paste((255, 255, 255), (10, 0, 30, 20))  # white middle half
    out = resize_to_bucket(image, (16, 16))
    assert out.size == (16, 16)
    assert np.asarray(out).min() > 200  # the crop keeps the white centre only


def test_bucket_batch_sampler_batches_share_a_key_and_reshuffle_per_epoch():
    keys = ["a"] * 7 + ["b"] * 5
    sampler = BucketBatchSampler(keys, batch_size=2, seed=3, drop_last=False)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4 + 3
    assert sorted(i for b in batches for i in b) == list(range(12))
    assert all(len({keys[i] for i in b}) == 1 for b in batches)
    assert batches == list(sampler)  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != batches
    full = BucketBatchSampler(keys, batch_size=2, seed=3)
    assert len(full) == 3 + 2 and all(len(b) == 2 for b in full)
    assert full.left_out() == {"a": (1, 7), "b": (1, 5)} and sampler.left_out() == {}
    small = BucketBatchSampler(keys + ["c"] * 3, batch_size=4)  # "c" is never seen, and it is said
    assert small.left_out() == {"a": (3, 7), "b": (1, 5), "c": (3, 3)}
    assert not {i for b in small for i in b} & {12, 13, 14}


def test_the_reward_model_trainer_says_what_its_buckets_leave_out(capsys):
    from types import SimpleNamespace

    from rlkit.trainers.reward_model import _report_left_out

    sampler = BucketBatchSampler(["a"] * 9 + ["b"] * 3, batch_size=4)
    with pytest.warns(UserWarning, match=r"3 pairs in 1 latent-shape bucket\(s\) smaller than a global batch of 4 "
                                         r"are never trained on: b \(3\)"):
        _report_left_out(sampler, SimpleNamespace(is_main_process=True))
    assert "4 of 12 pairs sit out each epoch" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------- cache-latents

def _cache_fixture(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    png(img / "big_a.png", (32, 32), (200, 30, 30))
    png(img / "big_b.png", (40, 40), (30, 200, 30))  # same aspect, bucketed to 32x32 too
    png(img / "wide.png", (16, 32), (30, 30, 200))  # 1:2, no bucket
    png(img / "small.png", (8, 8), (90, 90, 90))  # under the minimum size
    records = [
        {"prompt": "red circle", "image_path": ["img/big_a.png", "img/big_b.png", "img/big_a.png"], "rank": [1, 2, 3]},
        {"prompt": "blue square", "path1": "img/big_a.png", "path2": "img/wide.png"},
        {"prompt": "gray", "path1": "img/small.png", "path2": "img/big_a.png"},
    ]
    ranked = write_jsonl(tmp_path / "ranked.jsonl", records[:1])
    hpd = write_jsonl(tmp_path / "hpd.jsonl", records[1:])
    return ranked, hpd


def test_cache_latents_buckets_encodes_once_and_reads_back(tmp_path, tiny_generator):
    from rlkit.cache_latents import cache_latents

    ranked, hpd = _cache_fixture(tmp_path)
    buckets = BucketConfig(sizes=[(16, 16), (32, 32)], min_pixels=16 * 16, divisible=4)
    pairs = load_pairs(ranked) + load_pairs(hpd)
    report = cache_latents(pairs, tiny_generator, tmp_path / "out/lat.parquet", buckets, batch_size=2,
                           progress=False)
    assert report.pairs_in == 5 and report.written == 3
    assert report.dropped == {"no_shared_bucket": 1, "too_small": 1}
    assert report.buckets == {"32x32": 3}
    assert report.encoded_images == 2  # big_a and big_b, each encoded once
    cached = load_pairs(tmp_path / "out/lat.parquet")
    assert [p.kind for p in cached] == ["latent"] * 3
    assert cached[0].meta["image1_path"] == "img/big_a.png"
    batch = collate_pairs(cached)
    image = Image.open(tmp_path / "img/big_b.png").convert("RGB")
    from rlkit.data import image_to_tensor

    with torch.no_grad():
        want = tiny_generator.encode(image_to_tensor(resize_to_bucket(image, (32, 32)))[None])[0]
    first_b = next(i for i, p in enumerate(cached) if p.meta["image2_path"] == "img/big_b.png")
    assert batch.chosen.shape[1:] == want.shape
    assert torch.allclose(batch.rejected[first_b], want, atol=1e-4)  # batched encode: float noise only
    # the cache names the VAE's scaling and shift; a generator with another VAE refuses it, naming the file
    from types import SimpleNamespace

    from rlkit.cache_latents import cache_metadata, check_vae_factors

    vae = tiny_generator.vae.config
    meta = cache_metadata(tmp_path / "out/lat.parquet")
    assert (meta["vae_scaling_factor"], meta["vae_shift_factor"]) == (vae.scaling_factor, vae.shift_factor)
    check_vae_factors(cached, vae)
    other = SimpleNamespace(scaling_factor=vae.scaling_factor * 2, shift_factor=vae.shift_factor)
    with pytest.raises(ValueError, match=r"lat\.parquet: its latents were cached with a VAE scaling_factor of"):
        check_vae_factors(cached, other)


def test_cache_latents_tells_images_apart_by_what_they_are_not_by_the_name_written(tmp_path, tiny_generator):
    """The same relative name in two data folders, and hub records whose ``path`` is one bare file name, are
    different pictures: each pair keeps its own latents (they had all been given the first one's)."""
    from rlkit.cache_latents import cache_latents
    from rlkit.data import image_to_tensor

    colours = {"d1": ((255, 0, 0), (0, 0, 255)), "d2": ((0, 255, 0), (255, 255, 0))}
    sources = []
    for name, (chosen, rejected) in colours.items():
        (tmp_path / name / "images").mkdir(parents=True)
        png(tmp_path / name / "images/x.png", (32, 32), chosen)
        png(tmp_path / name / "images/y.png", (32, 32), rejected)
        sources.append(write_jsonl(tmp_path / name / "train.jsonl",
                                   [{"prompt": name, "path1": "images/x.png", "path2": "images/y.png"}]))
    hub = [(200, 200, 200), (50, 50, 50), (120, 0, 120), (0, 120, 120)]
    table = pa.table({"prompt": ["h1", "h2"],
                      "chosen": [{"bytes": png_bytes((32, 32), hub[0]), "path": "image.png"},
                                 {"bytes": png_bytes((32, 32), hub[2]), "path": "image.png"}],
                      "rejected": [{"bytes": png_bytes((32, 32), hub[1]), "path": "image.png"},
                                   {"bytes": png_bytes((32, 32), hub[3]), "path": "image.png"}]})
    pq.write_table(table, tmp_path / "hub.parquet")
    pairs = load_pairs(sources[0]) + load_pairs(sources[1]) + load_pairs(tmp_path / "hub.parquet")
    buckets = BucketConfig(sizes=[(32, 32)], min_pixels=0, divisible=4)
    report = cache_latents(pairs, tiny_generator, tmp_path / "lat.parquet", buckets, batch_size=8, progress=False)
    assert report.written == 4 and report.encoded_images == 8
    want = {"d1": colours["d1"], "d2": colours["d2"], "h1": hub[:2], "h2": hub[2:]}
    for pair in load_pairs(tmp_path / "lat.parquet"):
        batch = collate_pairs([pair])
        for side, colour in zip((batch.chosen[0], batch.rejected[0]), want[pair.prompt]):
            image = image_to_tensor(Image.new("RGB", (32, 32), colour))[None]
            with torch.no_grad():
                torch.testing.assert_close(side, tiny_generator.encode(image)[0], atol=1e-4, rtol=1e-4)


def test_cache_latents_cli_writes_parquet_with_min_size_setting(tmp_path, tiny_sd3_dir, capsys):
    from rlkit.cache_latents import main

    _, hpd = _cache_fixture(tmp_path)
    out = tmp_path / "cli.parquet"
    rc = main(["--data", str(hpd), "--generator", str(tiny_sd3_dir), "--out", str(out), "--buckets", "8x8,32x32",
               "--min-size", "8", "--divisible", "4", "--device", "cpu", "--no-progress"])
    assert rc == 0
    cached = load_pairs(out)
    assert len(cached) == 1  # the wide pair still has no shared bucket; the small one now passes
    assert cached[0].prompt == "gray" and cached[0].shapes[0] == cached[0].shapes[1]
    rc = main(["--data", str(tmp_path / "nope.jsonl"), "--generator", str(tiny_sd3_dir), "--out", str(out)])
    assert rc == 2
    capsys.readouterr()
    empty = tmp_path / "empty.parquet"  # every pair dropped: an error, not an empty file
    assert main(["--data", str(hpd), "--generator", str(tiny_sd3_dir), "--out", str(empty), "--min-size", "4096",
                 "--device", "cpu", "--no-progress"]) == 2
    assert "no pair to write (2 read, dropped: {'too_small': 2})" in capsys.readouterr().err
    small = tmp_path / "img/small.png"
    noise = np.random.default_rng(0).integers(0, 256, (*Image.open(small).size[::-1], 3), dtype=np.uint8)
    Image.fromarray(noise).save(small)
    small.write_bytes(small.read_bytes()[:200])  # the header reads (its size is known), the pixels do not
    assert main(["--data", str(hpd), "--generator", str(tiny_sd3_dir), "--out", str(empty), "--buckets", "8x8,32x32",
                 "--min-size", "8", "--divisible", "4", "--device", "cpu", "--no-progress"]) == 2
    assert not list(tmp_path.glob("empty.parquet*"))  # neither the file nor a half-written .tmp


def test_a_label_for_the_second_side_orients_the_pair_so_chosen_wins(tmp_path):
    """Sets stored as ``a`` / ``b`` with ``label`` = P(a preferred) (the Shapes pairs): a pair whose label says
    ``b`` won is swapped on loading, so every consumer (training, eval-reward) reads chosen as the winner."""
    za, zb = np.ones((2, 3, 4), dtype=np.float32), np.zeros((2, 3, 4), dtype=np.float32)
    table = pa.table({"prompt": ["a wins", "b wins", "b mostly"], "latents_a": [za.tolist()] * 3,
                      "latents_b": [zb.tolist()] * 3, "label": [1.0, 0.0, 0.25]})
    pq.write_table(table, tmp_path / "ab.parquet")
    for fmt in ("latents", "generic"):
        pairs = load_pairs(tmp_path / "ab.parquet", format=fmt,
                           columns={"chosen": "latents_a", "rejected": "latents_b"})
        assert [p.label for p in pairs] == [1.0, 1.0, 0.75], fmt
        batch = collate_pairs(pairs)
        assert [float(c.mean()) for c in batch.chosen] == [1.0, 0.0, 0.0], fmt
        assert pairs[1].columns == ("latents_b", "latents_a")
    with pytest.raises(PreferenceDataError, match="label must lie in"):
        pq.write_table(pa.table({"prompt": ["x"], "latents_a": [za.tolist()], "latents_b": [zb.tolist()],
                                 "label": [1.5]}), tmp_path / "bad.parquet")
        load_pairs(tmp_path / "bad.parquet", format="latents", columns={"chosen": "latents_a", "rejected": "latents_b"})


def test_a_synthetic_source_names_the_key_whose_value_is_not_a_number():
    from rlkit.data.synthetic import SyntheticPreferenceConfig

    assert SyntheticPreferenceConfig.parse("synthetic:pairs=40,signal=0.5").pairs == 40
    with pytest.raises(ValueError, match=r"'synthetic:pairs=1e3': pairs must be an integer, got '1e3'"):
        SyntheticPreferenceConfig.parse("synthetic:pairs=1e3")
    with pytest.raises(ValueError, match=r"expected key=value with keys .*got 'pair=3'"):
        SyntheticPreferenceConfig.parse("synthetic:pair=3")
