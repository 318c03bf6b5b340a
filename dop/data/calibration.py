"""Calibration samples for the DOP search: ``load_calibration(data_cfg, n) -> [{id, image, question}]``
(``load_calibration_set``: the samples and their ``source``, what was drawn from where).

``data_cfg`` is a mapping (a ``conf/data/*.yaml`` node or a plain dict); ``data_cfg.kind`` (else
``data_cfg.name``) picks the source:

- ``synthetic``  the synthetic benchmark (``dop.data.synthetic``), split ``calibration_split``;
- ``disk``       a ``datasets.save_to_disk`` directory (``Dataset`` or ``DatasetDict``), a set of
  parquet / json / jsonl / csv files laid out as a hub repository, or an HF hub cache folder
  (``datasets--<org>--<name>``, its snapshot): ``path``, ``split`` (else ``calibration_split``, else
  ``train``), ``subset`` (optional: a dataset config, the folder ``<path>/<subset>``),
  ``image_column`` (``image``), ``question_column`` (``question``), ``id_column`` (optional: else an
  ``id`` column if present, else the row index), ``data_files`` (optional, explicit files for ``split``);
- ``lmms_eval``  the docs of an lmms-eval task: ``task``, ``include_path`` (optional), ``split``
  (optional: default the task's non-evaluated split, ``non_evaluated_split``); image =
  ``task.doc_to_visual(doc)[0]``, question = ``task.doc_to_text(doc)`` (the task's raw prompt text),
  id = the doc index;
- ``llava_json`` a LLaVA instruction-tuning JSON (``json_file``; records ``{"id", "image",
  "conversations"}``) with its ``image_folder``: every (human, gpt) round of the records whose image
  is under ``image_prefix`` is one sample (``rounds=first``: the first round only); question = the
  human turn without ``<image>``, answer = the gpt turn, id = ``<record index>:<record id>#<round>``.

The first ``n`` rows are taken, or a seeded sample when ``shuffle_seed`` is set. Images are PIL RGB.
Fewer than ``n`` rows: a warning, and all of them are returned.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from dop.data.synthetic import ensure_from_config, load_dataset_dir
from dop.errors import DopError

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("synthetic", "disk", "lmms_eval", "llava_json")
_ALIASES = {"lmms_task": "lmms_eval", "lmms-eval": "lmms_eval", "lmms": "lmms_eval", "on_disk": "disk"}
_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
LMMS_MODEL_NAME = "dop"  # = dop.evaluation.plugin.MODEL_NAME (not imported: that module pulls in torch)


class CalibrationError(DopError, ValueError):
    """A calibration source that cannot give the requested samples."""


@dataclass
class CalibrationSet:
    """Calibration samples and their provenance.

    ``source``: ``kind``; ``dataset`` (a resolved local path, or the hub id of an lmms-eval task's
    dataset), ``config`` (a dataset config or ``None``), ``split`` (``None`` where the source has no
    splits), ``files`` (the data files read, when known); lmms-eval tasks add ``task`` and
    ``evaluated_split``. ``shuffle_seed`` and the selected ``ids`` complete what ``record`` reports.
    """

    samples: list[dict[str, Any]]
    source: dict[str, Any]
    shuffle_seed: int | None = None
    requested: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [str(s["id"]) for s in self.samples]

    def record(self) -> dict[str, Any]:
        """What a search records about its calibration data (search.json, policy metadata)."""
        return {**self.source, "requested": self.requested, "num_samples": len(self.samples),
                "shuffle_seed": self.shuffle_seed, "ids": self.ids, **self.extra}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def load_calibration(data_cfg: Any, n: int) -> list[dict[str, Any]]:
    """``n`` calibration samples ``{"id": str, "image": PIL.Image (RGB), "question": str}``."""
    return load_calibration_set(data_cfg, n).samples


def load_calibration_set(data_cfg: Any, n: int) -> CalibrationSet:
    """``n`` calibration samples with their provenance (``CalibrationSet``)."""
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
    loader = {"synthetic": _load_synthetic, "disk": _load_disk, "lmms_eval": _load_lmms_eval,
              "llava_json": _load_llava_json}[kind]
    out = loader(cfg, n)
    out.source = {"kind": kind, **out.source}
    out.shuffle_seed, out.requested = _get(cfg, "shuffle_seed"), n
    return out


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
    cfg = {**cfg, "image_column": "image", "question_column": "question", "id_column": None, "shuffle_seed": None}
    rows = _rows(dd[split_name], n, cfg, f"synthetic split {split_name!r}", Path(path))
    return CalibrationSet(rows, {"dataset": str(Path(path).resolve()), "config": None, "split": split_name})


# --------------------------------------------------------------------------------------------
# disk
# --------------------------------------------------------------------------------------------
def _load_disk(cfg: dict[str, Any], n: int) -> CalibrationSet:
    given = Path(str(_required(cfg, "path", "disk"))).expanduser()
    split = str(_get(cfg, "split") or _get(cfg, "calibration_split") or "train")
    subset = _get(cfg, "subset")
    root = hub_snapshot(given) or given
    path = root / str(subset) if subset else root
    if subset and not path.is_dir():
        configs = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise CalibrationError(f"{given} has no config folder {subset!r} (data.subset; folders: {configs})")
    ds, files, split_used = _open_disk(path, split, _get(cfg, "data_files"))
    base = path if path.is_dir() else path.parent
    rows = _rows(ds, n, cfg, f"{path} split {split!r}", base)
    return CalibrationSet(rows, {"dataset": str(path.resolve()), "config": subset, "split": split_used,
                                 "files": files, "hub_id": hub_id(given)})


def hub_snapshot(path: Path) -> Path | None:
    """The snapshot folder when ``path`` is an HF hub cache folder of one repository
    (``datasets--<org>--<name>``, holding ``snapshots/``): the one ``refs/main`` names, else the newest."""
    snaps = path / "snapshots"
    if not snaps.is_dir():
        return None
    ref = path / "refs" / "main"
    if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
        return snaps / ref.read_text().strip()
    found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def hub_id(path: str | os.PathLike) -> str | None:
    """``org/name`` when ``path`` lies in an HF hub cache folder ``datasets--org--name``."""
    for part in Path(path).expanduser().resolve().parts:
        m = re.fullmatch(r"datasets--([^-].*?)--(.+)", part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return None


def _open_disk(path: Path, split: str, data_files: Any) -> tuple[Any, list[str], str | None]:
    """The split's dataset, the files read (empty for save_to_disk dirs) and the split (``None`` for a
    lone saved ``Dataset``)."""
    if data_files:
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        files = [str(f if Path(f).is_absolute() else path / f) for f in files]
        return _load_files(files, split, f"data.data_files of {path}"), _resolved(files), split
    if not path.exists():
        raise CalibrationError(f"calibration data path {path} does not exist")
    if path.is_dir() and (path / "dataset_dict.json").exists():
        dd = datasets.load_from_disk(str(path))
        if split not in dd:
            raise CalibrationError(f"{path} has no split {split!r} (splits: {sorted(dd)}); set data.split")
        return dd[split], [], split
    if path.is_dir() and (path / "state.json").exists():  # a single saved Dataset: split is moot
        return datasets.load_from_disk(str(path)), [], None
    if path.is_file():
        return _load_files([str(path)], split, str(path)), _resolved([path]), split
    files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in _FILE_BUILDERS)
    if not files:
        raise CalibrationError(f"{path} is neither a datasets.save_to_disk directory nor holds "
                               f"{'/'.join(_FILE_BUILDERS)} files")
    # Hub-style layouts name files (or folders) after their split: train-00000.parquet, test/x.jsonl.
    of_split = [f for f in files if any(part == split or part.startswith(f"{split}-") or part.startswith(f"{split}.")
                                        or part.startswith(f"{split}_")
                                        for part in Path(f).relative_to(path).parts)]
    configs = {Path(f).relative_to(path).parts[0] for f in of_split if len(Path(f).relative_to(path).parts) > 1}
    configs -= {"data", split}
    if len(configs) > 1:  # a repository with configs: <config>/<split>-*.parquet, one folder each
        raise CalibrationError(f"{path}: split {split!r} is in several config folders {sorted(configs)}; "
                               "name one with data.subset")
    chosen = of_split or files
    return _load_files(chosen, split, str(path)), _resolved(chosen), split


def _resolved(files: Sequence[str | os.PathLike]) -> list[str]:
    return sorted(str(Path(f).resolve()) for f in files)


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


_VALIDATION_LIKE = ("validation", "val", "dev", "minival")


def evaluated_split(task_config: Any) -> str | None:
    """The split lmms-eval evaluates for a task config (``test_split``, else ``validation_split``)."""
    return getattr(task_config, "test_split", None) or getattr(task_config, "validation_split", None)


def non_evaluated_split(task_config: Any, available: Sequence[str]) -> str | None:
    """The calibration split of a task by default: its ``validation_split`` / ``training_split`` /
    ``fewshot_split`` that is not the evaluated one and exists, else another split of its dataset
    (validation-like names first, then ``train``, then the rest by name); ``None`` when the dataset
    holds the evaluated split only."""
    evaluated = evaluated_split(task_config)
    declared = [getattr(task_config, k, None) for k in ("validation_split", "training_split", "fewshot_split")]
    for split in declared:
        if split and split != evaluated and split in available:
            return split
    rest = sorted((s for s in available if s != evaluated),
                  key=lambda s: (s not in _VALIDATION_LIKE, s != "train", s))
    return rest[0] if rest else None


def _load_lmms_eval(cfg: dict[str, Any], n: int) -> CalibrationSet:
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

    dataset = getattr(task, "dataset", None)
    have = sorted(dataset) if dataset is not None else []
    evaluated = evaluated_split(task.config)
    split = _get(cfg, "split") or non_evaluated_split(task.config, have)
    if split is None:
        raise CalibrationError(f"lmms-eval task {name!r} holds only its evaluated split {evaluated!r} "
                               f"(splits: {have}); set data.split to another split of its dataset, or calibrate "
                               "on other data (data=gqa_train, data=disk, data=llava_json)")
    if dataset is None or split not in dataset:
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
    dataset_path = getattr(task.config, "dataset_path", None)
    local = dataset_path is not None and Path(str(dataset_path)).expanduser().exists()
    return CalibrationSet(out, {"task": name, "dataset": str(Path(str(dataset_path)).expanduser().resolve()) if local
                                else dataset_path, "config": getattr(task.config, "dataset_name", None),
                                "split": split, "evaluated_split": evaluated})


# --------------------------------------------------------------------------------------------
# llava_json
# --------------------------------------------------------------------------------------------
def _load_llava_json(cfg: dict[str, Any], n: int) -> CalibrationSet:
    path = Path(str(_required(cfg, "json_file", "llava_json"))).expanduser()
    if not path.is_file():
        raise CalibrationError(f"LLaVA JSON {path} does not exist (data.json_file)")
    folder = Path(str(_get(cfg, "image_folder") or path.parent)).expanduser()
    prefix = str(_get(cfg, "image_prefix") or "")
    rounds = str(_get(cfg, "rounds", "all"))
    if rounds not in ("all", "first"):
        raise CalibrationError(f"data.rounds={rounds!r} is not valid; valid: all, first")
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{path}: not a readable JSON list of LLaVA records ({e})") from e
    if not isinstance(records, list):
        raise CalibrationError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    # (record, round, question, answer) of every usable single-turn sample, in file order
    turns: list[tuple[int, int, str, str | None]] = []
    for r, rec in enumerate(records):
        image = rec.get("image") if isinstance(rec, Mapping) else None
        if not isinstance(image, str) or not image.startswith(prefix):
            continue
        conv = rec.get("conversations") or []
        for k in range(0, len(conv) - 1 if rounds == "all" else min(len(conv) - 1, 1), 2):
            human, gpt = conv[k], conv[k + 1]
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                raise CalibrationError(f"{path} record {r} (id {rec.get('id')!r}): round {k // 2} is "
                                       f"{human.get('from')!r}/{gpt.get('from')!r}, expected human/gpt")
            question = _drop_image_marker(str(human.get("value", "")))
            turns.append((r, k // 2, question, str(gpt.get("value", ""))))
    what = f"LLaVA JSON {path}" + (f" (images under {prefix!r})" if prefix else "")
    idx = _indices(len(turns), n, _get(cfg, "shuffle_seed"), what)
    if not idx:
        raise CalibrationError(f"{what} has no question with an image: no calibration samples")
    out = []
    for i in idx:
        r, k, question, answer = turns[i]
        image = folder / records[r]["image"]
        if not image.is_file():
            raise CalibrationError(f"{what}: image {image} of record {r} is missing (data.image_folder={folder})")
        out.append({"id": f"{r}:{records[r].get('id')}#{k}", "image": _to_image(image, f"{what} record {r}"),
                    "question": question, "answer": answer})
    return CalibrationSet(out, {"dataset": str(path.resolve()), "config": prefix or None, "split": None,
                                "image_folder": str(folder.resolve()), "rounds": rounds})


def _drop_image_marker(text: str) -> str:
    """A LLaVA human turn without its ``<image>`` marker (and the line break around it)."""
    return re.sub(r"\s*<image>\s*", " ", text).strip()


__all__ = ["KINDS", "CalibrationError", "CalibrationSet", "load_calibration", "load_calibration_set"]
