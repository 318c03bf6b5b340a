"""The synthetic image-QA benchmark: determinism, splits, answers consistent with the images."""

import json
from collections import Counter

import datasets
import numpy as np
import pytest

from dop.data import chance_accuracy, ensure_dataset, generate_splits, load_dataset_dir
from dop.data import synthetic as syn

SIZES = {"train": 40, "val": 20, "test": 70}


def _raw(ds):
    """Rows with the image as stored PNG bytes (no decoding)."""
    return ds.cast_column("image", datasets.Image(decode=False)).to_dict()


@pytest.fixture(scope="module")
def splits():
    return generate_splits(0, SIZES)


def test_same_seed_same_bytes(splits):
    again = generate_splits(0, SIZES)
    for split in SIZES:
        assert _raw(splits[split]) == _raw(again[split])


def test_different_seed_differs(splits):
    other = generate_splits(1, SIZES)
    a, b = _raw(splits["test"]), _raw(other["test"])
    assert a["image"] != b["image"]
    assert a["question"] != b["question"]


def test_sample_depends_only_on_seed_split_index():
    small = generate_splits(0, {"test": 10})["test"]
    big = generate_splits(0, {"test": 30})["test"]
    assert _raw(small) == _raw(big.select(range(10)))


def test_splits_sizes_columns_and_types(splits):
    assert {k: len(v) for k, v in splits.items()} == SIZES
    for ds in splits.values():
        assert {"id", "image", "question", "answer", "qtype"} <= set(ds.column_names)
        assert isinstance(ds.features["image"], datasets.Image)
        assert len(set(ds["id"])) == len(ds)
    for split in ("val", "test"):
        assert set(splits[split]["qtype"]) <= set(syn.QA_TYPES)
        assert all(len(a.split()) == 1 for a in splits[split]["answer"])
    # train also holds the stage-1 caption samples
    assert set(syn.CAPTION_TYPES) <= set(splits["train"]["qtype"])
    assert set(syn.QA_TYPES) <= set(generate_splits(0, {"test": 200})["test"]["qtype"])


def _cells_seen(image: np.ndarray, grid: int) -> dict[int, str]:
    """Read the image back: per cell, the palette colour covering >= 5% of it (if any)."""
    img = image.astype(np.float32)
    cell = img.shape[0] // grid
    names = list(syn.COLOURS)
    pal = np.asarray([syn.COLOURS[c] for c in names], np.float32)
    seen = {}
    for i in range(grid * grid):
        r, c = divmod(i, grid)
        px = img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].reshape(-1, 3)
        d = np.linalg.norm(px[:, None, :] - pal[None], axis=-1)
        near = d.min(1) < 60
        if near.mean() > 0.05:
            seen[i] = names[Counter(d.argmin(1)[near].tolist()).most_common(1)[0][0]]
    return seen


def test_answers_match_scene_and_image(splits):
    for split in SIZES:
        for row in splits[split]:
            scene = syn.Scene.from_json(row["scene"])
            # the stored answer is what the scene says
            assert syn.answer_question(scene, row["qtype"], json.loads(row["args"])) == row["answer"]
            # and the scene is what the image shows: objects (and colours) per cell, hence the count
            seen = _cells_seen(np.asarray(row["image"]), scene.grid)
            assert seen == {o.cell: o.colour for o in scene.objects}, row["id"]
            if row["qtype"] == "count":
                assert syn.NUMBER_WORDS[len(seen)] == row["answer"]


def test_exists_balanced_and_questions_posable():
    ds = generate_splits(3, {"test": 400})["test"]
    ex = [a for a, t in zip(ds["answer"], ds["qtype"]) if t == "exists"]
    assert 0.3 < ex.count("yes") / len(ex) < 0.7
    ro = [a for a, t in zip(ds["answer"], ds["qtype"]) if t == "right_of"]
    assert "nothing" in ro and len(set(ro)) > 2


def test_chance_accuracy(splits):
    c = chance_accuracy(splits["test"])
    assert 0.15 < c["chance"] < 0.5
    assert c["chance"] <= c["blind"] <= c["blind_question"] <= 1.0


def test_ensure_dataset_atomic_and_cached(tmp_path):
    out = ensure_dataset(tmp_path / "synthetic", seed=0, sizes={"val": 5, "test": 6})
    assert out == tmp_path / "synthetic"
    ds = load_dataset_dir(out)
    assert {k: len(v) for k, v in ds.items()} == {"val": 5, "test": 6}
    mtime = (out / "dop_meta.json").stat().st_mtime_ns
    assert ensure_dataset(out, seed=0, sizes={"val": 5, "test": 6}) == out
    assert (out / "dop_meta.json").stat().st_mtime_ns == mtime  # not regenerated
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    with pytest.raises(ValueError):
        ensure_dataset(out, seed=1, sizes={"val": 5, "test": 6})
