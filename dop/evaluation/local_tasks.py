"""lmms-eval benchmarks from a local copy of their dataset, with lmms-eval's own task code.

Clusters without internet hold each benchmark's dataset on disk. ``write_local_task`` writes a task
YAML that ``include:``s lmms-eval's original task YAML by absolute path and overrides only where the
data comes from, under a new name, so lmms-eval's own ``doc_to_visual``, ``doc_to_text`` (with its
pre/post prompts), generation kwargs, ``process_results`` and aggregation run unchanged::

    name = write_local_task("pope", "outputs/tasks", dataset_path="/data/POPE")   # "dop_local_pope"
    lmms-eval --model dop --tasks dop_local_pope --include_path outputs/tasks

A local copy is one of (``expected_layout(task)`` says which splits and columns):

- a ``DatasetDict.save_to_disk`` directory holding the task's split (or ``<dir>/<dataset_name>/``
  for multi-config datasets such as MMBench's ``en``/``cn`` or ScienceQA's ``ScienceQA-IMG``);
- a folder of data files named by split: ``<split>-*.parquet`` / ``<split>.parquet`` /
  ``<split>/*.parquet`` (also ``.arrow``, ``.json``, ``.jsonl``), directly, under ``data/`` or under
  ``<dataset_name>/``: the layout of the hub repositories;
- an HF hub cache folder (``$HF_HOME/hub``, or its ``datasets--<org>--<name>`` folder): the snapshot
  of the task's repository is read as a folder of data files.

Besides the dataset, two overrides: GQA's ``process_docs`` downloads its images, so the derived task
reads them from the local copy's ``testdev_balanced_images`` config instead (same join on
``imageId``); and ``judge=False`` replaces MMBench's GPT-judged aggregation by lmms-eval's rule-based
("static") scoring (metric name unchanged: ``gpt_eval_score``; see ``JUDGE_FREE``).

``TaskManager(include_path=out_dir, include_defaults=False)`` is enough to load derived tasks (the
include is by absolute path), which skips indexing lmms-eval's ~2,000 task files.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
from lmms_eval.utils import load_yaml_config

from dop.evaluation.benchmarks import Benchmark, BenchmarkError
from dop.evaluation.tasks import TASK_NAME as SYNTHETIC_TASK

PREFIX = "dop_local_"
NO_JUDGE_SUFFIX = "_static"

# lmms-eval's task directory, found without importing lmms_eval.tasks (whose import takes seconds).
LMMS_TASKS_DIR = Path(importlib.util.find_spec("lmms_eval").origin).parent / "tasks"  # type: ignore[arg-type]

# The columns each task family's utils read (keyed by lmms-eval's task folder). A local copy
# missing one fails at write time instead of as a KeyError deep in lmms-eval.
TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "gqa": ("id", "imageId", "question", "answer"),
    "mmbench": ("index", "question", "hint", "answer", "A", "B", "C", "D", "category", "L2-category",
                "source", "split", "image"),
    "mme": ("question_id", "question", "answer", "category", "image"),
    "pope": ("question_id", "question", "answer", "image"),
    "scienceqa": ("question", "choices", "answer", "hint", "image"),
    "vqav2": ("question_id", "question", "answers", "image"),
    "textvqa": ("question_id", "question", "answers", "ocr_tokens", "image"),
    "vizwiz_vqa": ("question_id", "question", "answers", "image"),
    "mmmu": ("id", "question", "options", "answer", "question_type", "image_1"),
    "seedbench": ("question_id", "question", "answer", "choice_a", "choice_b", "choice_c", "choice_d",
                  "data_type", "image"),
    "ocrbench": ("question", "answer", "dataset", "question_type", "image"),
    "ok_vqa": ("question_id", "question", "answers", "image"),
}

# GQA keeps its images in a second config, joined on a column; its process_docs downloads them.
IMAGE_CONFIGS: dict[str, tuple[str, str]] = {"gqa": ("testdev_balanced_images", "imageId")}
IMAGE_COLUMNS: tuple[str, ...] = ("id", "image")

# Judge-free scoring (lmms-eval's own rule-based MMBench scoring, as its mmbench_en_dev_static task):
# task folder -> the process_results key whose aggregation is replaced.
JUDGE_FREE: dict[str, str] = {"mmbench": "gpt_eval_score"}

_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}


class LocalDatasetError(BenchmarkError):
    """A benchmark's local copy is missing or lacks a split or column the task reads."""


@dataclass(frozen=True)
class LocalSplit:
    """Where one split of a local copy lives, in lmms-eval's dataset terms."""

    dataset_path: str                  # a save_to_disk directory, or a datasets builder ("parquet", ...)
    split: str
    data_files: tuple[str, ...] = ()   # with a builder: the split's files (absolute)

    @property
    def from_disk(self) -> bool:
        return not self.data_files

    def yaml_fields(self) -> dict[str, Any]:
        """The dataset fields of a task YAML that load this split."""
        if self.from_disk:
            return {"dataset_path": self.dataset_path, "dataset_name": None,
                    "dataset_kwargs": {"load_from_disk": True}}
        return {"dataset_path": self.dataset_path, "dataset_name": None,
                "dataset_kwargs": {"data_files": {self.split: list(self.data_files)}}}

    def load(self) -> datasets.Dataset:
        if self.from_disk:
            return datasets.load_from_disk(self.dataset_path)[self.split]
        return datasets.load_dataset(self.dataset_path, data_files={self.split: list(self.data_files)},
                                     split=self.split)

    def column_names(self) -> list[str] | None:
        """The split's columns, read from metadata only (None where the format does not say)."""
        if self.from_disk:
            return list(datasets.load_from_disk(self.dataset_path)[self.split].column_names)
        first = self.data_files[0]
        if self.dataset_path == "parquet":
            return list(pq.read_schema(first).names)
        if self.dataset_path == "arrow":
            return list(datasets.Dataset.from_file(first).column_names)
        return None


@dataclass(frozen=True)
class TaskInfo:
    """What the original task YAML says about its data (includes resolved)."""

    name: str
    yaml_path: Path
    folder: str                        # lmms-eval's task folder, e.g. "mmbench"
    split: str | None
    dataset_path: str | None
    dataset_name: str | None
    members: tuple[str, ...] = ()      # a group's tasks

    @property
    def is_group(self) -> bool:
        return bool(self.members)


# --- the original task ----------------------------------------------------------------------------
def find_task_yaml(task: str) -> Path:
    """The YAML of lmms-eval task (or group) ``task``, by a text scan (the TaskManager index is slow)."""
    pattern = re.compile(rf"^(task|group)\s*:\s*[\"']?{re.escape(task)}[\"']?\s*(#.*)?$", re.MULTILINE)
    for path in sorted(LMMS_TASKS_DIR.rglob("*.yaml")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if pattern.search(text):
            config = load_yaml_config(str(path), mode="simple")
            if config.get("task") == task or config.get("group") == task:
                return path
    raise BenchmarkError(f"lmms-eval has no task or group {task!r} (searched {LMMS_TASKS_DIR})")


@functools.cache
def task_info(task: str) -> TaskInfo:
    path = find_task_yaml(task)
    config = load_yaml_config(str(path), mode="simple")
    members = config.get("task") if isinstance(config.get("task"), list) else []
    names = tuple(m if isinstance(m, str) else str(m.get("task")) for m in members)
    return TaskInfo(name=task, yaml_path=path, folder=path.parent.relative_to(LMMS_TASKS_DIR).parts[0],
                    split=config.get("test_split"), dataset_path=config.get("dataset_path"),
                    dataset_name=config.get("dataset_name"), members=names)


def expected_layout(task: str, info: TaskInfo | None = None) -> str:
    """One line: the split, the columns and the accepted layouts of a local copy of ``task``."""
    info = info or task_info(task)
    if info.is_group:
        return "; ".join(expected_layout(m) for m in info.members)
    cols = TASK_COLUMNS.get(info.folder)
    sub = f" (or under {info.dataset_name}/)" if info.dataset_name else ""
    text = (f"split {info.split!r}{' with columns ' + ', '.join(cols) if cols else ''}, as a "
            f"DatasetDict.save_to_disk dir{sub}, data files {info.split}-*.parquet (or .arrow/.jsonl, "
            f"directly, under data/{sub}), or an HF hub cache folder of {info.dataset_path}")
    if info.folder in IMAGE_CONFIGS:
        config, key = IMAGE_CONFIGS[info.folder]
        text += f"; images: config {config!r} (columns id, image; joined on {key}) beside it"
    return text


# --- finding a local copy ---------------------------------------------------------------------------
def _hub_snapshot(root: Path, repo_id: str | None) -> Path | None:
    """The snapshot folder of ``repo_id`` when ``root`` is an HF hub cache (or one repo's folder in it)."""
    repo_dirs: list[Path] = []
    if (root / "snapshots").is_dir():
        repo_dirs = [root]
    elif repo_id:
        org, _, name = repo_id.partition("/")
        for base in (root, root / "hub"):
            exact = base / f"datasets--{org}--{name}"
            others = sorted(base.glob(f"datasets--*--{name}")) if base.is_dir() else []
            repo_dirs = [exact] if exact.is_dir() else others
            if repo_dirs:
                break
    for repo in repo_dirs:
        if not (repo / "snapshots").is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
            return repo / "snapshots" / ref.read_text().strip()
        snaps = sorted((repo / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime)
        if snaps:
            return snaps[-1]
    return None


def _split_files(folder: Path, split: str) -> list[Path]:
    for ext in _BUILDERS:
        for pattern in (f"{split}-*{ext}", f"{split}{ext}", f"{split}/*{ext}"):
            files = sorted(p for p in folder.glob(pattern) if p.is_file())
            if files:
                return files
    return []


def _candidates(root: Path, dataset_name: str | None, repo_id: str | None, config_only: bool) -> list[Path]:
    """The folders that may hold a split, in the order they are tried."""
    base = _hub_snapshot(root, repo_id) or root
    tops = ([base / dataset_name] if dataset_name else []) + ([] if config_only else [base])
    return [f for top in tops for f in (top, top / "data")]


def find_split(root: str | os.PathLike, split: str, dataset_name: str | None = None,
               repo_id: str | None = None, *, config_only: bool = False) -> LocalSplit | None:
    """``split`` of a local copy under ``root`` (any accepted layout), or None when there is none.

    ``dataset_name`` (a config) is looked for first as a subfolder; ``config_only`` looks nowhere else.
    """
    root = Path(root).expanduser().resolve()
    if not root.exists():
        return None
    for folder in _candidates(root, dataset_name, repo_id, config_only):
        if (folder / "dataset_dict.json").is_file():
            splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
            if split in splits:
                return LocalSplit(str(folder), split)
            continue
        files = _split_files(folder, split) if folder.is_dir() else []
        if files:
            same = tuple(str(f) for f in files if f.suffix == files[0].suffix)
            return LocalSplit(_BUILDERS[files[0].suffix], split, same)
    return None


def _what_is_there(root: str | os.PathLike, info: TaskInfo) -> str:
    """For an error message: the save_to_disk dirs found under ``root`` and their splits."""
    root = Path(root).expanduser().resolve()
    if not root.exists():
        return "it does not exist"
    found = [f"{f} has splits {json.loads((f / 'dataset_dict.json').read_text()).get('splits')}"
             for f in _candidates(root, info.dataset_name, info.dataset_path, False)
             if (f / "dataset_dict.json").is_file()]
    return "; ".join(found) or "no dataset found there"


def locate(task: str, dataset_path: str | os.PathLike, info: TaskInfo | None = None) -> LocalSplit:
    """The task's split in the local copy, its columns checked; ``LocalDatasetError`` otherwise."""
    info = info or task_info(task)
    if info.split is None:
        raise LocalDatasetError(f"benchmark {task!r}: the lmms-eval task has no test_split to redirect")
    found = find_split(dataset_path, info.split, info.dataset_name, info.dataset_path)
    if found is None:
        raise LocalDatasetError(f"benchmark {task!r}: no local copy at {dataset_path} "
                                f"({_what_is_there(dataset_path, info)}); expected {expected_layout(task, info)}")
    have = found.column_names()
    missing = [c for c in TASK_COLUMNS.get(info.folder, ()) if have is not None and c not in have]
    if missing:
        raise LocalDatasetError(f"benchmark {task!r}: {found.dataset_path} split {info.split!r} lacks "
                                f"column(s) {', '.join(missing)}; expected {expected_layout(task, info)}")
    return found


def _locate_images(task: str, dataset_path: str | os.PathLike, info: TaskInfo) -> LocalSplit:
    config, key = IMAGE_CONFIGS[info.folder]
    found = find_split(dataset_path, str(info.split), config, info.dataset_path, config_only=True)
    if found is None:
        raise LocalDatasetError(f"benchmark {task!r}: no images config {config!r} (split {info.split!r}, "
                                f"columns id, image; joined on {key}) at {dataset_path}; expected "
                                f"{expected_layout(task, info)}")
    have = found.column_names()
    missing = [c for c in IMAGE_COLUMNS if have is not None and c not in have]
    if missing:
        raise LocalDatasetError(f"benchmark {task!r}: images config {config!r} at {found.dataset_path} "
                                f"lacks column(s) {', '.join(missing)}")
    return found


# --- writing the derived task ---------------------------------------------------------------------
def local_task_name(task: str, *, local: bool = True, judge: bool = True) -> str:
    """``dop_local_<task>`` for a redirected dataset; ``_static`` appended when the judge is off."""
    name = f"{PREFIX}{task}" if local else f"dop_{task}"
    return name + ("" if judge else NO_JUDGE_SUFFIX)


def _yaml_value(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML: strings quoted and escaped, lists and dicts inline


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: parallel jobs may share the dir
    tmp.write_text(text)
    os.replace(tmp, path)


def write_local_task(task: str, out_dir: str | os.PathLike, *, dataset_path: str | os.PathLike | None = None,
                     judge: bool = True) -> str:
    """Write a task derived from lmms-eval's ``task`` into ``out_dir/<name>/`` and return its name.

    ``dataset_path``: the local copy (None keeps the original's hub dataset). ``judge=False``: a
    GPT-judged task scores with lmms-eval's rule-based matcher instead (MMBench); other tasks have no
    judge and are unchanged by it. A group derives each member and a group over them.
    """
    info = task_info(task)
    if dataset_path is None and (judge or (info.folder not in JUDGE_FREE and not info.is_group)):
        return task  # nothing to change: the original task runs as it is
    judge = judge or info.folder not in JUDGE_FREE  # only a judged task changes without its judge
    name = local_task_name(task, local=dataset_path is not None, judge=judge)
    folder = Path(out_dir) / name
    lines = [f"# Generated by dop.evaluation.local_tasks: lmms-eval's {task!r} with "
             + ("its dataset read from a local copy" if dataset_path is not None else "its hub dataset")
             + ("" if judge else ", scored without a GPT judge"),
             f"include: {_yaml_value(str(info.yaml_path))}"]
    if info.is_group:
        members = [write_local_task(m, out_dir, dataset_path=dataset_path, judge=judge) for m in info.members]
        lines += [f"group: {_yaml_value(name)}", f"task: {_yaml_value(members)}"]
        _write(folder / f"{name}.yaml", "\n".join(lines) + "\n")
        return name
    lines += [f"task: {_yaml_value(name)}", "tag: []"]
    utils: list[str] = []
    if dataset_path is not None:
        found = locate(task, dataset_path, info)
        for key, value in found.yaml_fields().items():
            lines.append(f"{key}: {_yaml_value(value)}")
        if info.folder in IMAGE_CONFIGS and "image" not in (found.column_names() or ()):
            images = _locate_images(task, dataset_path, info)
            spec = {"dataset_path": images.dataset_path, "split": images.split,
                    "data_files": list(images.data_files)}
            utils += [f"_IMAGES = {json.dumps(spec)}", "", "",
                      "def process_docs(dataset):",
                      f"    return attach_images(dataset, _IMAGES, key={IMAGE_CONFIGS[info.folder][1]!r})"]
            lines.append("process_docs: !function utils.process_docs")
        elif info.folder in IMAGE_CONFIGS:
            lines.append("process_docs: null  # the local copy holds the images already")
    if not judge and info.folder in JUDGE_FREE:
        metric = JUDGE_FREE[info.folder]
        # Only the judged metric is kept: the original's `submission` metric writes an .xlsx file.
        lines += ["metric_list:", f"  - metric: {metric}", "    aggregation: !function utils.mmbench_static_score",
                  "    higher_is_better: true"]
    if utils or not judge:
        header = ['"""Generated by dop.evaluation.local_tasks; the functions live in dop."""',
                  "from dop.evaluation.task_hooks import attach_images, mmbench_static_score  # noqa: F401"]
        _write(folder / "utils.py", "\n".join(header + ([""] if utils else []) + utils) + "\n")
    _write(folder / f"{name}.yaml", "\n".join(lines) + "\n")
    return name


def benchmark_tasks(bench: Benchmark, out_dir: str | os.PathLike) -> tuple[str, ...]:
    """The lmms-eval tasks that run ``bench``: its own, or tasks derived into ``out_dir`` when its
    dataset is a local copy (``bench.dataset_path``) or its judge is off (``bench.judge``).

    Pass the result to ``Benchmark.metric_values(results, task_names=...)``. dop's own synthetic task
    reads ``dataset_path`` itself and is returned as it is.
    """
    if bench.dataset_path is None and bench.judge:
        return bench.tasks
    return tuple(t if t == SYNTHETIC_TASK else
                 write_local_task(t, out_dir, dataset_path=bench.dataset_path, judge=bench.judge)
                 for t in bench.tasks)


def main(argv: Sequence[str]) -> int:
    """``python -m dop.evaluation.local_tasks TASK DATASET_PATH OUT_DIR [--no-judge]``: print the task name."""
    args = [a for a in argv if a != "--no-judge"]
    if len(args) != 3:
        print(main.__doc__, file=sys.stderr)
        return 2
    task, dataset, out = args
    try:
        print(write_local_task(task, out, dataset_path=dataset, judge="--no-judge" not in argv))
    except BenchmarkError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
