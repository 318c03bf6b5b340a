"""Calibration samples (dop.data.calibration): on-disk datasets, lmms-eval task docs, errors."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from dop.data import ensure_dataset, load_calibration, load_dataset_dir
from dop.data.calibration import CalibrationError, load_calibration_set


def _images(k, size=8):
    return [Image.fromarray(np.full((size, size, 3), 10 * i, dtype=np.uint8)) for i in range(k)]


def _compose(data, overrides):
    from hydra import compose, initialize_config_dir

    from dop.stages import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"data={data}", "paths.run_dir=/nonexistent", *overrides])


def _check(samples, k):
    assert len(samples) == k
    for s in samples:
        assert set(s) == {"id", "image", "question"}
        assert isinstance(s["id"], str) and isinstance(s["question"], str)
        assert isinstance(s["image"], Image.Image) and s["image"].mode == "RGB"


@pytest.fixture(scope="module")
def disk_dd(tmp_path_factory):
    """A DatasetDict with PIL images (one grey-scale), custom column names, saved with save_to_disk."""
    path = tmp_path_factory.mktemp("disk") / "vqa"
    imgs = _images(6)
    imgs[1] = imgs[1].convert("L")
    train = datasets.Dataset.from_dict(
        {"img": imgs, "prompt": [f"question {i} ?" for i in range(6)], "qid": [f"q{i}" for i in range(6)]},
        features=datasets.Features({"img": datasets.Image(), "prompt": datasets.Value("string"),
                                    "qid": datasets.Value("string")}))
    datasets.DatasetDict({"train": train, "validation": train.select(range(2))}).save_to_disk(str(path))
    return path


def test_disk_save_to_disk(disk_dd):
    cfg = {"kind": "disk", "path": str(disk_dd), "split": "train", "image_column": "img",
           "question_column": "prompt", "id_column": "qid"}
    samples = load_calibration(cfg, 4)
    _check(samples, 4)
    assert [s["id"] for s in samples] == ["q0", "q1", "q2", "q3"]
    assert [s["question"] for s in samples] == [f"question {i} ?" for i in range(4)]
    assert samples[2]["image"].getpixel((0, 0)) == (20, 20, 20)
    shuffled = load_calibration({**cfg, "shuffle_seed": 3}, 4)
    assert shuffled == load_calibration({**cfg, "shuffle_seed": 3}, 4)  # seeded: reproducible
    assert {s["id"] for s in shuffled} <= {f"q{i}" for i in range(6)}
    with pytest.warns(UserWarning, match="fewer than"):
        _check(load_calibration({**cfg, "split": "validation"}, 5), 2)  # fewer rows: all of them
    with pytest.raises(CalibrationError, match="no split 'test'.*train"):
        load_calibration({**cfg, "split": "test"}, 2)
    with pytest.raises(CalibrationError, match="no column 'question'"):
        load_calibration({**cfg, "question_column": "question"}, 2)


def test_disk_parquet_and_single_dataset(tmp_path):
    ds = datasets.Dataset.from_dict({"image": _images(3), "question": ["a", "b", "c"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "question": datasets.Value("string")}))
    (tmp_path / "files").mkdir()
    ds.to_parquet(str(tmp_path / "files" / "train-00000.parquet"))  # Hub-style file set
    ds.select([0]).to_parquet(str(tmp_path / "files" / "test-00000.parquet"))
    samples = load_calibration({"kind": "disk", "path": str(tmp_path / "files")}, 2)
    _check(samples, 2)
    assert [(s["id"], s["question"]) for s in samples] == [("0", "a"), ("1", "b")]
    with pytest.warns(UserWarning, match="only 3 rows"):  # train-* files only, not test-*
        assert len(load_calibration({"kind": "disk", "path": str(tmp_path / "files")}, 5)) == 3
    ds.save_to_disk(str(tmp_path / "single"))  # a lone Dataset: the split is moot
    assert [s["question"] for s in load_calibration({"kind": "disk", "path": str(tmp_path / "single")}, 3)] == ["a", "b", "c"]


def test_disk_config_composes_into_sweep_loader(disk_dd, tmp_path):
    """conf/data/disk.yaml through the sweep stage's calibration loader (the non-synthetic dispatch)."""
    from dop.stages.config import SweepStage, load
    from dop.stages.schema import ConfigError
    from dop.stages.sweep import calibration_samples

    over = [f"data.path={disk_dd}", "data.image_column=img", "data.question_column=prompt", "method.num_calibration=3"]
    conf = load(SweepStage, _compose("disk", over))
    assert conf.data.split == "train"
    _check(calibration_samples(conf), 3)
    conf = load(SweepStage, _compose("disk", [*over, "data.path=null"]))
    with pytest.raises(ConfigError, match="data.path must be set"):
        calibration_samples(conf)


@pytest.fixture(scope="module")
def synthetic_task(tmp_path_factory):
    from dop.evaluation.tasks import write_task_dir

    root = tmp_path_factory.mktemp("lmms")
    data = ensure_dataset(root / "synthetic", seed=0, sizes={"train": 4, "val": 4, "test": 8})
    return data, write_task_dir(data, root / "tasks")


def test_lmms_eval_task_docs(synthetic_task):
    data, task_dir = synthetic_task
    base = {"kind": "lmms_eval", "task": "dop_synthetic", "include_path": str(task_dir)}
    # by default the task's non-evaluated split: dop_synthetic evaluates "test", its dataset also has val
    default = load_calibration_set(base, 3)
    assert default.source["split"] == "val" and default.source["evaluated_split"] == "test"
    assert [s["question"] for s in default.samples] == [q for q in load_dataset_dir(data)["val"]["question"][:3]]
    samples = load_calibration({**base, "split": "test"}, 5)  # the evaluated split, asked for explicitly
    _check(samples, 5)
    test = load_dataset_dir(data)["test"]
    assert [s["id"] for s in samples] == [str(i) for i in range(5)]
    for i, s in enumerate(samples):
        assert test[i]["question"] in s["question"]
        assert s["image"].size == test[i]["image"].size
    # the Hydra config (name lmms_task -> kind lmms_eval), another split, fewer docs than asked
    cfg = _compose("lmms_task", ["data.task=dop_synthetic", f"data.include_path={task_dir}", "data.split=train"])
    with pytest.warns(UserWarning, match="fewer than"):
        train = load_calibration(cfg.data, 10)
    assert [s["question"] for s in train] == list(load_dataset_dir(data)["train"]["question"])


def test_errors(synthetic_task, disk_dd):
    _, task_dir = synthetic_task
    with pytest.raises(CalibrationError, match="unknown calibration data kind 'hub'.*disk.*lmms_eval"):
        load_calibration({"kind": "hub"}, 4)
    with pytest.raises(CalibrationError, match=">= 1"):
        load_calibration({"kind": "lmms_eval", "task": "dop_synthetic", "include_path": str(task_dir)}, 0)
    with pytest.raises(CalibrationError, match=">= 1"):
        load_calibration({"kind": "disk", "path": str(disk_dd)}, -2)
    with pytest.raises(CalibrationError, match="data.task must be set"):
        load_calibration({"kind": "lmms_eval", "task": "???"}, 2)
    with pytest.raises(CalibrationError, match="unknown lmms-eval task 'dop_synthtic'.*close names: .*dop_synthetic"):
        load_calibration({"kind": "lmms_eval", "task": "dop_synthtic", "include_path": str(task_dir)}, 2)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration({"kind": "disk", "path": str(disk_dd) + "_nope"}, 2)
