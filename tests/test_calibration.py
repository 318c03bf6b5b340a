"""Calibration samples (dop.data.calibration): on-disk datasets, lmms-eval task docs, errors."""

from __future__ import annotations

import json

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


# --- LLaVA instruction-tuning JSON (data=llava_json, data=gqa_train) ------------------------------------------
@pytest.fixture(scope="module")
def llava_json(tmp_path_factory):
    """A llava_v1_5_mix665k.json-shaped file: GQA records (two rounds), a COCO record, a text-only record."""
    root = tmp_path_factory.mktemp("llava")
    for sub, k in (("gqa/images", 3), ("coco/train2017", 1)):
        (root / sub).mkdir(parents=True)
        for i, im in enumerate(_images(k)):
            im.save(root / sub / f"{i}.jpg")
    records = [
        {"id": "g0", "image": "gqa/images/0.jpg", "conversations": [
            {"from": "human", "value": "<image>\nIs the cup red?\nAnswer the question using a single word or phrase."},
            {"from": "gpt", "value": "Yes"},
            {"from": "human", "value": "What is on the table?"}, {"from": "gpt", "value": "cup"}]},
        {"id": "c0", "image": "coco/train2017/0.jpg", "conversations": [
            {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "a dog"}]},
        {"id": "t0", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "g1", "image": "gqa/images/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhich color is the car?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "g2", "image": "gqa/images/2.jpg", "conversations": [
            {"from": "human", "value": "Who is sitting?\n<image>"}, {"from": "gpt", "value": "the man"}]},
    ]
    path = root / "mix.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_json_rounds_prefix_ids_and_provenance(llava_json):
    root = llava_json.parent
    cfg = {"kind": "llava_json", "json_file": str(llava_json), "image_folder": str(root), "image_prefix": "gqa/",
           "rounds": "all", "shuffle_seed": None}
    with pytest.warns(UserWarning, match="fewer than"):
        cal = load_calibration_set(cfg, 10)
    # every (human, gpt) round of the GQA records, in file order; COCO and text-only records skipped
    assert [s["id"] for s in cal.samples] == ["0:g0#0", "0:g0#1", "3:g1#0", "4:g2#0"]
    assert [s["question"] for s in cal.samples] == [
        "Is the cup red?\nAnswer the question using a single word or phrase.", "What is on the table?",
        "Which color is the car?", "Who is sitting?"]
    assert [s["answer"] for s in cal.samples] == ["Yes", "cup", "blue", "the man"]
    assert all(s["image"].mode == "RGB" for s in cal.samples)
    assert cal.samples[2]["image"].getpixel((0, 0)) == (10, 10, 10)  # gqa/images/1.jpg
    record = cal.record()
    assert record["kind"] == "llava_json" and record["dataset"] == str(llava_json.resolve())
    assert record["split"] is None and record["num_samples"] == 4 and record["requested"] == 10
    assert record["ids"] == [s["id"] for s in cal.samples] and record["shuffle_seed"] is None
    first = load_calibration({**cfg, "rounds": "first", "image_prefix": None}, 4)
    assert [s["id"] for s in first] == ["0:g0#0", "1:c0#0", "3:g1#0", "4:g2#0"]
    seeded = load_calibration_set({**cfg, "shuffle_seed": 1}, 2)
    assert seeded.ids == load_calibration_set({**cfg, "shuffle_seed": 1}, 2).ids  # reproducible
    assert set(seeded.ids) <= {"0:g0#0", "0:g0#1", "3:g1#0", "4:g2#0"} and seeded.record()["shuffle_seed"] == 1


def test_llava_json_config_and_errors(llava_json, tmp_path):
    from dop.stages.config import SweepStage, load
    from dop.stages.sweep import calibration_set

    root = llava_json.parent
    conf = load(SweepStage, _compose("gqa_train", [f"data.json_file={llava_json}", f"data.image_folder={root}",
                                                   "method.num_calibration=3"]))
    assert conf.data.kind == "llava_json" and conf.data.image_prefix == "gqa/" and conf.data.shuffle_seed == 0
    cal = calibration_set(conf)
    assert len(cal.samples) == 3 and all(i.split(":")[1][0] == "g" for i in cal.ids) and cal.shuffle_seed == 0
    base = {"kind": "llava_json", "json_file": str(llava_json), "image_folder": str(tmp_path)}
    with pytest.raises(CalibrationError, match="image .*0.jpg of record 0 is missing"):
        load_calibration(base, 1)
    with pytest.raises(CalibrationError, match="data.rounds='two'"):
        load_calibration({**base, "rounds": "two"}, 1)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration({**base, "json_file": str(tmp_path / "nope.json")}, 1)
    with pytest.raises(CalibrationError, match="no question with an image"):
        load_calibration({**base, "image_prefix": "ocr_vqa/"}, 1)


# --- a dataset as the hub lays it out, or as the HF hub cache holds it ---------------------------------------
def test_disk_hub_cache_folder_with_configs(tmp_path):
    """``datasets--org--name/snapshots/<sha>/<config>/<split>-*.parquet``: the snapshot refs/main names is
    read, a config folder is chosen with data.subset, and the provenance names the hub repository."""
    ds = datasets.Dataset.from_dict({"image": _images(3), "question": ["a", "b", "c"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "question": datasets.Value("string")}))
    repo = tmp_path / "datasets--lmms-lab--MyVQA"
    snap = repo / "snapshots" / "abc123"
    for config, rows in (("easy", ds), ("hard", ds.select([2, 1]))):
        (snap / config).mkdir(parents=True)
        rows.to_parquet(str(snap / config / "validation-00000-of-00001.parquet"))
    (repo / "snapshots" / "old999" / "easy").mkdir(parents=True)  # a stale snapshot refs/main does not name
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    cfg = {"kind": "disk", "path": str(repo), "split": "validation", "subset": "hard"}
    cal = load_calibration_set(cfg, 2)
    assert [s["question"] for s in cal.samples] == ["c", "b"]
    src = cal.record()
    assert src["hub_id"] == "lmms-lab/MyVQA" and src["config"] == "hard" and src["split"] == "validation"
    assert src["files"] == [str((snap / "hard" / "validation-00000-of-00001.parquet").resolve())]
    with pytest.raises(CalibrationError, match="several config folders .*easy.*hard.*data.subset"):
        load_calibration({**cfg, "subset": None}, 1)
    with pytest.raises(CalibrationError, match="no config folder 'medium'"):
        load_calibration({**cfg, "subset": "medium"}, 1)
