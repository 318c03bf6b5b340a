"""``dop stage=train``: train the embedded tiny LLaVA (``dop.training.tiny_llava``) and report its
accuracy on the synthetic test split.

    dop stage=train train.seed=1              # writes last.ckpt + train_info.json in the run dir
    dop stage=train train.out_dir=dop/assets/tiny_llava

Knobs in ``conf/train/default.yaml``; the data group gives the synthetic set (grid, image size).
A run resumes from ``last.ckpt`` in its run dir (``train.resume``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dop.data import synthetic as syn
from dop.models import load_model
from dop.stages.config import TrainStage, load
from dop.training.tiny_llava import (
    TASK_TEST_SAMPLES,
    TrainConfig,
    evaluate_accuracy,
    evaluate_task_formats,
    fit,
)

log = logging.getLogger("dop.train")


def run(cfg: DictConfig) -> dict[str, Any]:
    """``dop stage=train``."""
    return execute(load(TrainStage, cfg))


def train_config(conf: TrainStage) -> TrainConfig:
    """``conf/train`` as the trainer's ``TrainConfig`` (``num_threads=`` overrides ``train.num_threads``)."""
    section = dataclasses.asdict(conf.train)
    for key in ("resume", "out_dir", "arch"):
        section.pop(key)
    section["betas"] = tuple(section["betas"])
    if conf.num_threads:
        section["num_threads"] = int(conf.num_threads)
    return TrainConfig(**section, arch=conf.train.arch)


def execute(conf: TrainStage) -> dict[str, Any]:
    """Train (or resume) in the run dir, save the model to ``train.out_dir`` (default ``<run>/model``)
    and, on the synthetic data, record its test accuracy in ``train_info.json``."""
    tc = train_config(conf)
    run_dir = Path(conf.paths.run_dir)
    out_dir = Path(conf.train.out_dir) if conf.train.out_dir else run_dir / "model"
    os.environ.setdefault("OMP_NUM_THREADS", str(tc.num_threads))
    _, info = fit(tc, run_dir, out_dir, resume=conf.train.resume)
    if conf.data.kind == "synthetic":
        path = syn.ensure_from_config(conf.data)
        test = syn.load_dataset_dir(path)["test"]
        model, proc = load_model(str(out_dir), dtype="float32")
        res = evaluate_accuracy(model, proc, test)
        info["test"] = {k: v for k, v in res.items() if k != "predictions"}
        info["chance"] = syn.chance_accuracy(test)
        log.info("test accuracy %.4f (chance %.3f, blind %.3f)", res["accuracy"], info["chance"]["chance"],
                 info["chance"]["blind"])
        rows = syn.task_rows(conf.data.seed, "task_test", TASK_TEST_SAMPLES, grid=tc.arch.grid,
                             image_size=tc.arch.image_size)  # held-out prompts in the 13 benchmarks' formats
        tasks = evaluate_task_formats(model, proc, rows)
        info["task_formats"] = {k: v for k, v in tasks.items() if k != "predictions"}
        log.info("benchmark formats: %s", json.dumps(tasks["per_family"]))
    (run_dir / "train_info.json").write_text(json.dumps(info, indent=2))
    return info
