"""Calibration samples for the DOP search: ``load_calibration(data_cfg, n) -> [{id, image, question}]``.

``data_cfg`` is a mapping (a ``conf/data/*.yaml`` node or a plain dict); ``data_cfg.kind`` (else
``data_cfg.name``) picks the source:

- ``synthetic``  the synthetic benchmark (``dop.data.synthetic``), split ``calibration_split``;
- ``disk``       a ``datasets.save_to_disk`` directory (``Dataset`` or ``DatasetDict``) or a set of
  parquet / json / jsonl / csv files: ``path``, ``split`` (else ``calibration_split``, else
  ``train``), ``image_column`` (``image``), ``question_column`` (``question``), ``id_column``
  (optional: else an ``id`` column if present, else the row index), ``data_files`` (optional,
  explicit files for ``split``);
- ``lmms_eval``  the docs of an lmms-eval task: ``task``, ``include_path`` (optional), ``split``
  (optional: default the task's ``test_split``, else its ``validation_split``); image =
  ``task.doc_to_visual(doc)[0]``, question = ``task.doc_to_text(doc)`` (the task's raw prompt text),
  id = the doc index.

The first ``n`` rows are taken, or a seeded sample when ``shuffle_seed`` is set. Images are PIL RGB.
Fewer than ``n`` rows: a warning, and all of them are returned.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from dop.data.synthetic import ensure_from_config, load_dataset_dir
from dop.errors import DopError

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("synthetic", "disk", "lmms_eval")
_ALIASES = {"lmms_task": "lmms_eval", "lmms-eval": "lmms_eval", "lmms": "lmms_eval", "on_disk": "disk"}
_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
LMMS_MODEL_NAME = "dop"  # = dop.evaluation.plugin.MODEL_NAME (not imported: that module pulls in torch)


class CalibrationError(DopError, ValueError):
    """A calibration source that cannot give the requested samples."""


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def load_calibration(data_cfg: Any, n: int) -> list[dict[str, Any]]:
    """``n`` calibration samples ``{"id": str, "image": PIL.Image (RGB), "question": str}``."""
    cfg = _plain(data_cfg)
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            n = int(n)
        except (TypeError, ValueError):
            raise CalibrationError(f"number of calibration samples must be an int >= 1, got {n!r}") from None
    if n < 1:
        raise CalibrationError(f"number of calibration samples must be >= 1, got {n}")
    raw = cfg.get("kind") or cfg.get("name")
    kind = _ALIASES.get(str(raw), str(raw))
    if kind not in KINDS:
        raise CalibrationError(f"unknown calibration data kind {raw!r}; valid kinds: {', '.join(KINDS)} "
                               "(set data.kind)")
    loader = {"synthetic": _load_synthetic, "disk": _load_disk, "lmms_eval": _load_lmms_eval}[kind]
    return loader(cfg, n)


def _plain(data_cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(data_cfg) and not isinstance(data_cfg, type):  # the stages' typed data config
        return {**dataclasses.asdict(data_cfg), "kind": getattr(data_cfg, "kind", None)}
    if not isinstance(data_cfg, Mapping):
        raise CalibrationError(f"data config must be a mapping, got {type(data_cfg).__name__}")
    return dict(data_cfg)


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``cfg[key]``, with ``None`` and OmegaConf's missing marker ``???`` read as unset."""
    value = cfg.get(key, default)
    return default if value is None or value == "???" else value


def _required(cfg: Mapping[str, Any], key: str, kind: str) -> Any:
    value = _get(cfg, key)
    if value is None or value == "":
        raise CalibrationError(f"data.{key} must be set for calibration data kind {kind!r}")
    return value


def _indices(total: int, n: int, seed: Any, what: str) -> list[int]:
    if total < n:
        msg = f"{what} has only {total} rows, fewer than the {n} calibration samples asked for; using all {total}"
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
    if seed is None:
        return list(range(min(n, total)))
    return [int(i) for i in np.random.default_rng(int(seed)).permutation(total)[:n]]


def _to_image(value: Any, where: str, base: Path | None = None) -> Any:
    """A PIL RGB image from a PIL image, an ``{"bytes", "path"}`` dict, raw bytes, a path or an array."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    try:
        if isinstance(value, Mapping):
            if value.get("bytes"):
                return _to_image(value["bytes"], where, base)
            if value.get("path"):
                return _to_image(value["path"], where, base)
        elif isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as im:
                return im.convert("RGB")
        elif isinstance(value, (str, os.PathLike)):
            p = Path(value)
            if not p.is_absolute() and base is not None and (base / p).exists():
                p = base / p
            with Image.open(p) as im:
                return im.convert("RGB")
        elif hasattr(value, "__array__"):
            return Image.fromarray(np.asarray(value)).convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoding failure is reported with its location
        raise CalibrationError(f"{where}: cannot decode an image from {type(value).__name__} ({e})") from e
    raise CalibrationError(f"{where}: expected an image, got {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------
def _load_synthetic(cfg: dict[str, Any], n: int) -> list[dict[str, Any]]:
    path = ensure_from_config(cfg, _required(cfg, "path", "synthetic"))
    split_name = str(_get(cfg, "calibration_split", "val"))
    dd = load_dataset_dir(path)
    if split_name not in dd:
        raise CalibrationError(f"synthetic data at {path} has no split {split_name!r} (splits: {sorted(dd)})")
    cfg = {**cfg, "image_column": "image", "question_column": "question", "id_column": None}
    return _rows(dd[split_name], n, cfg, f"synthetic split {split_name!r}", Path(path))


# --------------------------------------------------------------------------------------------
# disk
# --------------------------------------------------------------------------------------------
def _load_disk(cfg: dict[str, Any], n: int) -> list[dict[str, Any]]:
    path = Path(str(_required(cfg, "path", "disk"))).expanduser()
    split = str(_get(cfg, "split") or _get(cfg, "calibration_split") or "train")
    ds = _open_disk(path, split, _get(cfg, "data_files"))
    base = path if path.is_dir() else path.parent
    return _rows(ds, n, cfg, f"{path} split {split!r}", base)


def _open_disk(path: Path, split: str, data_files: Any) -> Any:
    if data_files:
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        files = [str(f if Path(f).is_absolute() else path / f) for f in files]
        return _load_files(files, split, f"data.data_files of {path}")
    if not path.exists():
        raise CalibrationError(f"calibration data path {path} does not exist")
    if path.is_dir() and (path / "dataset_dict.json").exists():
        dd = datasets.load_from_disk(str(path))
        if split not in dd:
            raise CalibrationError(f"{path} has no split {split!r} (splits: {sorted(dd)}); set data.split")
        return dd[split]
    if path.is_dir() and (path / "state.json").exists():  # a single saved Dataset: split is moot
        return datasets.load_from_disk(str(path))
    if path.is_file():
        return _load_files([str(path)], split, str(path))
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in _FILE_BUILDERS)
    if not files:
        raise CalibrationError(f"{path} is neither a datasets.save_to_disk directory nor holds "
                               f"{'/'.join(_FILE_BUILDERS)} files")
    # Hub-style layouts name files (or folders) after their split: train-00000.parquet, test/x.jsonl.
    of_split = [f for f in files if any(part == split or part.startswith(f"{split}-") or part.startswith(f"{split}.")
                                        or part.startswith(f"{split}_")
                                        for part in Path(f).relative_to(path).parts)]
    return _load_files(of_split or files, split, str(path))


def _load_files(files: list[str], split: str, what: str) -> Any:
    builders = {_FILE_BUILDERS.get(Path(f).suffix) for f in files}
    if None in builders or len(builders) != 1:
        raise CalibrationError(f"{what}: need files of one kind among {sorted(_FILE_BUILDERS)}, got {files[:5]}")
    try:
        return datasets.load_dataset(builders.pop(), data_files={split: files}, split=split)
    except Exception as e:  # noqa: BLE001
        raise CalibrationError(f"{what}: cannot read {len(files)} file(s) as a dataset ({e})") from e


def _rows(ds: Any, n: int, cfg: Mapping[str, Any], what: str, base: Path | None) -> list[dict[str, Any]]:
    image_col = str(_get(cfg, "image_column", "image"))
    question_col = str(_get(cfg, "question_column", "question"))
    id_col = _get(cfg, "id_column")
    answer_col = str(_get(cfg, "answer_column", "answer"))
    columns = list(ds.column_names)
    for key, col in (("image_column", image_col), ("question_column", question_col), ("id_column", id_col)):
        if col is not None and col not in columns:
            raise CalibrationError(f"{what}: no column {col!r} (data.{key}); columns: {columns}")
    if id_col is None and "id" in columns:
        id_col = "id"
    idx = _indices(len(ds), n, _get(cfg, "shuffle_seed"), what)
    if not idx:
        raise CalibrationError(f"{what} is empty: no calibration samples")
    out = []
    for i, row in zip(idx, ds.select(idx)):
        sample = {"id": str(row[id_col]) if id_col is not None else str(i),
                  "image": _to_image(row[image_col], f"{what} row {i}", base),
                  "question": str(row[question_col])}
        if answer_col in columns:  # reference answers, for the task-accuracy objective
            sample["answer"] = str(row[answer_col])
        out.append(sample)
    return out


# --------------------------------------------------------------------------------------------
# lmms_eval
# --------------------------------------------------------------------------------------------
def _task_manager(include_path: Any, task: str) -> Any:
    """A ``TaskManager`` that knows ``task``: the include path alone first (indexing lmms-eval's own
    ~2000 tasks takes seconds), then the full index. Unknown tasks raise with close names."""
    from lmms_eval.tasks import TaskManager  # noqa: PLC0415 - optional heavy dependency: only task calibration loads lmms-eval

    paths = None
    if include_path:
        paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, os.PathLike)) else include_path)]
        for p in paths:
            if not Path(p).is_dir():
                raise CalibrationError(f"lmms-eval include_path {p} is not a directory")
        tm = TaskManager("WARNING", include_path=paths, include_defaults=False, model_name=LMMS_MODEL_NAME)
        if task in tm.all_tasks:
            return tm
    tm = TaskManager("WARNING", include_path=paths, model_name=LMMS_MODEL_NAME)
    if task not in tm.all_tasks:
        close = difflib.get_close_matches(task, tm.all_tasks, n=8, cutoff=0.6)
        close += [t for t in tm.all_tasks if task.lower() in t.lower() and t not in close][: 8 - len(close)]
        hint = f"; close names: {', '.join(close)}" if close else ""
        where = f" (include_path={paths})" if paths else ""
        raise CalibrationError(f"unknown lmms-eval task {task!r}{where}{hint}")
    return tm


def _single_task(task_dict: Mapping[Any, Any], name: str) -> Any:
    from lmms_eval.api.task import Task  # noqa: PLC0415 - optional heavy dependency (see _task_manager)

    found = []

    def walk(d: Mapping[Any, Any]) -> None:
        for v in d.values():
            if isinstance(v, Mapping):
                walk(v)
            elif isinstance(v, Task):
                found.append(v)

    walk(task_dict)
    if len(found) != 1:
        raise CalibrationError(f"lmms-eval task {name!r} is a group of {len(found)} tasks; name one task")
    return found[0]


def _load_lmms_eval(cfg: dict[str, Any], n: int) -> list[dict[str, Any]]:
    name = str(_required(cfg, "task", "lmms_eval"))
    tm = _task_manager(_get(cfg, "include_path"), name)
    kind = tm.task_index.get(name, {}).get("type")
    if kind in ("group", "tag"):
        raise CalibrationError(f"lmms-eval name {name!r} is a {kind}, not a task; name one of its tasks")
    from lmms_eval.tasks import get_task_dict  # noqa: PLC0415 - optional heavy dependency (see _task_manager)

    try:
        task = _single_task(get_task_dict([name], tm), name)
    except CalibrationError:
        raise
    except Exception as e:  # noqa: BLE001 - dataset download / offline / config errors
        raise CalibrationError(f"cannot load lmms-eval task {name!r} ({type(e).__name__}: {e})") from e
    if getattr(task.config, "doc_to_visual", None) is None:
        raise CalibrationError(f"lmms-eval task {name!r} has no visuals (doc_to_visual unset): a text-only task "
                               "cannot calibrate an image pruning policy")

    split = _get(cfg, "split") or task.config.test_split or task.config.validation_split
    if split is None:
        raise CalibrationError(f"lmms-eval task {name!r} configures neither test_split nor validation_split; set data.split")
    dataset = getattr(task, "dataset", None)
    if dataset is None or split not in dataset:
        have = sorted(dataset) if dataset is not None else []
        raise CalibrationError(f"lmms-eval task {name!r} has no split {split!r} (splits: {have})")
    docs = dataset[split]
    what = f"lmms-eval task {name!r} split {split!r}"
    idx = _indices(len(docs), n, _get(cfg, "shuffle_seed"), what)
    if not idx:
        raise CalibrationError(f"{what} has no docs: no calibration samples")
    out = []
    for i in idx:
        doc = docs[i]
        visuals = task.doc_to_visual(doc)
        if isinstance(visuals, (str, bytes)) or not isinstance(visuals, (list, tuple)):
            visuals = [visuals] if visuals is not None else []
        if not visuals or visuals[0] is None:
            raise CalibrationError(f"{what} doc {i}: doc_to_visual gave no visual (a task without images?)")
        text = task.doc_to_text(doc)
        if not isinstance(text, str):
            raise CalibrationError(f"{what} doc {i}: doc_to_text gave {type(text).__name__}, not a prompt string")
        out.append({"id": str(i), "image": _to_image(visuals[0], f"{what} doc {i} (visual 0)"), "question": text})
    return out


__all__ = ["KINDS", "CalibrationError", "load_calibration"]
