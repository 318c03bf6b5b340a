"""Calibration data must not be a split a benchmark evaluates: the splits each benchmark evaluates,
and whether a calibration source (``dop.data.calibration.CalibrationSet.source``) is one of them.

    check_disjoint(calibration.source, resolve("paper13"))   # OverlapError naming both, or None

A split is identified by its dataset (a resolved local path, or a hub id compared by repository name,
so ``lmms-lab/POPE`` and lmms-eval's ``lmms-lab-encoder/POPE`` are one dataset), its config and its
split name, or by the data files read. A benchmark evaluates lmms-eval's ``test_split`` (else
``validation_split``) of each task, from the hub or from its local copy (``benchmark.dataset_path``,
located as ``dop.evaluation.local_tasks`` does); the synthetic benchmark evaluates the ``test`` split
of its dataset. A source without splits (a LLaVA JSON, a lone saved ``Dataset``) overlaps a benchmark
only through the same file or folder. Tasks dop cannot read the YAML of (custom include paths) are
not checked.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_eval.utils import load_yaml_config

from dop.evaluation.benchmarks import Benchmark, BenchmarkError
from dop.evaluation.local_tasks import LocalDatasetError, find_task_yaml, locate, task_info
from dop.evaluation.tasks import TASK_NAME as SYNTHETIC_TASK
from dop.evaluation.tasks import default_paths


class OverlapError(ValueError):
    """The calibration data is a split a configured benchmark evaluates."""


@dataclass(frozen=True)
class DataSplit:
    """One split of one dataset: where it is (``dataset``, ``files``), which config and split."""

    dataset: str | None  # a resolved local path, or a hub id
    config: str | None = None
    split: str | None = None
    files: tuple[str, ...] = ()
    hub_id: str | None = None  # a local copy's hub repository

    def describe(self) -> str:
        where = self.dataset or (f"{len(self.files)} file(s) from {Path(self.files[0]).parent}" if self.files else "?")
        return where + (f" config {self.config!r}" if self.config else "") + (f" split {self.split!r}" if self.split
                                                                                 else "")


def _is_local(name: str | None) -> bool:
    return bool(name) and Path(str(name)).is_absolute()


def _repo_name(name: str | None) -> str | None:
    """The repository name of a hub id, lower-case (``lmms-lab-encoder/POPE`` -> ``pope``)."""
    if not name or _is_local(name):
        return None
    return str(name).rsplit("/", 1)[-1].lower()


def _same_dataset(a: DataSplit, b: DataSplit) -> bool:
    if a.files and b.files and set(a.files) & set(b.files):
        return True
    if _is_local(a.dataset) and _is_local(b.dataset):
        pa, pb = Path(str(a.dataset)), Path(str(b.dataset))
        return pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa)
    names_a = {_repo_name(a.dataset), _repo_name(a.hub_id)} - {None}
    names_b = {_repo_name(b.dataset), _repo_name(b.hub_id)} - {None}
    return bool(names_a & names_b)


def overlaps(calibration: DataSplit, evaluated: DataSplit) -> bool:
    """Whether the calibration split is (part of) the evaluated one."""
    if calibration.split is not None and evaluated.split is not None and calibration.split != evaluated.split:
        return False
    if calibration.config and evaluated.config and calibration.config != evaluated.config:
        return False
    if calibration.split is None and not (calibration.files and evaluated.files):
        # no split: only the very same file or folder overlaps (a LLaVA JSON, a lone saved Dataset)
        return _is_local(calibration.dataset) and _is_local(evaluated.dataset) and _same_dataset(calibration,
                                                                                                    evaluated)
    return _same_dataset(calibration, evaluated)


def calibration_split(source: Mapping[str, Any]) -> DataSplit:
    """A calibration source (``CalibrationSet.source``, or what a search recorded) as a ``DataSplit``."""
    return DataSplit(dataset=source.get("dataset"), config=source.get("config") if source.get("kind") != "llava_json"
                     else None, split=source.get("split"), files=tuple(source.get("files") or ()),
                     hub_id=source.get("hub_id"))


@functools.cache
def _task_yaml(task: str) -> dict[str, Any]:
    return load_yaml_config(str(find_task_yaml(task)), mode="simple")


def _task_splits(task: str, dataset_path: str | None) -> list[DataSplit]:
    try:
        info = task_info(task)
    except BenchmarkError:
        return []  # not an lmms-eval task dop can read (a custom include path): not checked
    if info.is_group:
        return [s for m in info.members for s in _task_splits(m, dataset_path)]
    config = _task_yaml(task)
    split = config.get("test_split") or config.get("validation_split")
    hub = DataSplit(dataset=config.get("dataset_path"), config=config.get("dataset_name"), split=split)
    if dataset_path is None:
        return [hub]
    root = str(Path(dataset_path).expanduser().resolve())
    try:
        found = locate(task, dataset_path, info)
    except LocalDatasetError:  # the evaluation will say so; here the copy's folder stands for it
        return [hub, DataSplit(dataset=root, config=hub.config, split=split, hub_id=hub.dataset)]
    if found.from_disk:
        return [hub, DataSplit(dataset=str(Path(found.dataset_path).resolve()), split=split, hub_id=hub.dataset)]
    return [hub, DataSplit(dataset=None, split=split, files=tuple(sorted(str(Path(f).resolve())
                                                                          for f in found.data_files)),
                           hub_id=hub.dataset)]


def evaluated_splits(bench: Benchmark) -> list[DataSplit]:
    """The splits ``bench`` evaluates (see the module docstring)."""
    out = []
    for task in bench.tasks:
        if task == SYNTHETIC_TASK:
            path = Path(bench.dataset_path or default_paths()[0]).expanduser().resolve()
            out.append(DataSplit(dataset=str(path), split="test"))
        else:
            out.extend(_task_splits(task, bench.dataset_path))
    return out


def check_disjoint(source: Mapping[str, Any], benchmarks: Sequence[Benchmark], data_name: str = "") -> None:
    """Raise ``OverlapError`` (one line naming the calibration split and the benchmark) when the
    calibration source is a split one of ``benchmarks`` evaluates."""
    cal = calibration_split(source)
    for bench in benchmarks:
        for ev in evaluated_splits(bench):
            if overlaps(cal, ev):
                what = f"data={data_name}: " if data_name else ""
                raise OverlapError(
                    f"{what}calibrating on {cal.describe()}, the split benchmark {bench.name} evaluates "
                    f"({ev.describe()}); calibrate on another split (data.split / data.calibration_split) or "
                    "set data.allow_overlap=true to allow it")
