"""What ``dop stage=evaluate`` measures around lmms-eval: the cells to run (dense, policy files, a
baseline at each budget), their FLOPs, prefill latency and memory, lmms-eval's results of one
benchmark through the dop plugin, and the signature that says when a stored record still holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

from dop.budget import Budget
from dop.data.synthetic import ensure_from_config
from dop.engine.baselines import Method, MethodError
from dop.engine.baselines.budget import match_budget
from dop.evaluation.benchmarks import Benchmark
from dop.evaluation.local_tasks import benchmark_tasks
from dop.evaluation.plugin import MODEL_NAME
from dop.evaluation.scoring import SAMPLE_QUESTION, reduce_batch, running
from dop.evaluation.tasks import TASK_NAME, default_paths, task_config_hash, write_task_dir
from dop.flops import FlopsError, count_flops, equivalent_tokens
from dop.models import resolve_path
from dop.policy import Policy
from dop.results import ResultsStore

log = logging.getLogger("dop.evaluate")

_BUDGET_FILE = re.compile(r"^(?P<kind>[a-z_]+)_(?P<value>[0-9.eE+-]+)$")


# --- inputs ----------------------------------------------------------------------------------------
def policy_specs(policy_arg: str | None) -> list[dict[str, Any]]:
    """[{policy, path, budget_kind, budget_value}] for ``policy=``: None (dense), a file, or a dir."""
    if policy_arg in (None, "", "none", "dense"):
        return [{"policy": None, "path": None, "budget_kind": None, "budget_value": None}]
    path = Path(str(policy_arg))
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no policy YAML in {path}")
    specs = []
    for f in files:
        pol = Policy.from_yaml(str(f))
        kind, value = budget_of(pol, f)
        specs.append({"policy": pol, "path": str(f), "budget_kind": kind, "budget_value": value})
    return specs


def baseline_specs(method: Method, model: Any, groups: dict[str, int], budgets: list[Budget],
                   unreachable: list[str] | None = None) -> list[dict[str, Any]]:
    """One spec per budget: the method's knob matched to it on the sample prompt.

    Every budget is matched before anything is evaluated. An unreachable budget (``MethodError``
    naming the nearest reachable one) is appended to ``unreachable`` and the others still run; when
    no budget is reachable (or no list is given) the error is raised at once.
    """
    specs = []
    errors = []
    for budget in budgets:
        try:
            match = match_budget(method, model.config, groups, budget)
        except MethodError as err:
            if unreachable is None:
                raise
            errors.append(err)
            continue
        specs.append({"policy": None, "path": None, "budget_kind": budget.kind, "budget_value": budget.value,
                      "method": method, "knob": match.knob, "match": match, "tag": budget.name})
    if errors and not specs:
        raise errors[0]
    if unreachable is not None:
        unreachable.extend(str(e) for e in errors)
    return specs


def baseline_hash(method: Any, knob: Any) -> str:
    """The record's ``policy_hash`` for a baseline: its name, hyper-parameters and knob."""
    blob = json.dumps({"method": method.name, "hparams": method.hparams, "knob": knob}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def knob_arg(knob: Any) -> str:
    """A knob as lmms-eval ``model_args`` text (``knob=128``, ``knob=[2,0.9]``; the plugin reads YAML)."""
    return str(knob) if isinstance(knob, (int, float, str)) else json.dumps(knob, separators=(",", ":"))


def budget_of(policy: Any, path: Path) -> tuple[str | None, float | None]:
    """The budget a policy was searched for: its metadata, else a ``<kind>_<value>.yaml`` file name."""
    meta = getattr(policy, "meta", {}) or {}
    b = meta.get("budget")
    if isinstance(b, dict) and "kind" in b:
        return str(b["kind"]), float(b["value"])
    if "budget_kind" in meta:
        return str(meta["budget_kind"]), float(meta["budget_value"])
    m = _BUDGET_FILE.match(path.stem)
    if m:
        try:
            return m["kind"], float(m["value"])
        except ValueError:
            pass
    return None, None


def checkpoint_hash(pretrained: str) -> str | None:
    """A short hash of a local checkpoint (configs and weights up to 64 MB; larger files by name+size)."""
    try:
        path = Path(resolve_path(pretrained))
    except Exception:
        path = Path(pretrained)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        if size <= 64 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]








def flops_of(model: Any, groups: dict[str, int], policy: Any) -> tuple[float | None, float | None]:
    """(prefill TFLOPs, equivalent visual tokens) in the dop convention.

    The equivalent token count is None when a policy also cuts non-visual groups below their dense
    cost (no uniform visual-token count matches it); the TFLOPs are recorded regardless.
    """
    flops = count_flops(model.config, groups=groups, policy=policy, convention="dop")
    try:
        eq = equivalent_tokens(model.config, groups, flops) if groups.get("vision") else None
    except FlopsError as err:
        log.debug("no equivalent token count: %s", err)  # a policy that also prunes non-visual groups
        eq = None
    return flops / 1e12, eq


def prefill_latency(model: Any, inputs: Any, policy: Any, repeats: int = 3, method: Any = None,
                    knob: Any = None) -> float:
    """Median wall time of one prefill forward (batch 1) under the policy (or a baseline ``method``
    at ``knob``: its ``reduce_inputs`` is timed too), after one warm-up."""
    times = []
    with torch.inference_mode(), running(model, policy, method, knob):
        for i in range(repeats + 1):
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**reduce_batch(model, inputs, method, knob, policy, [SAMPLE_QUESTION]))
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except (ImportError, OSError):
        return None


@dataclass(frozen=True)
class TaskSetup:
    """How one benchmark runs in lmms-eval: its task names (derived ones for local copies), the
    include path that holds dop-written tasks, and a hash of those task files (None: lmms-eval's own)."""

    tasks: tuple[str, ...]
    include_path: str | None
    config_hash: str | None
    local: bool = False  # every task is written by dop: lmms-eval need not index its own ~2000 tasks


def task_setup(bench: Benchmark, run_dir: Path, data: Any = None) -> TaskSetup:
    """Write the tasks a benchmark needs into ``<run_dir>/tasks``: dop's synthetic task (a missing
    synthetic dataset is built with the data group's settings, ``data``, so it matches what training
    and calibration use), or lmms-eval tasks derived for a local dataset copy or without a judge."""
    task_dir = run_dir / "tasks"
    if TASK_NAME in bench.tasks:
        dataset = Path(bench.dataset_path or default_paths()[0])
        if not dataset.exists():
            dataset = Path(ensure_from_config(data if data is not None else {}, dataset))
        write_task_dir(dataset, task_dir)
        return TaskSetup(bench.tasks, str(task_dir), task_config_hash(task_dir), local=bench.tasks == (TASK_NAME,))
    tasks = benchmark_tasks(bench, task_dir)
    if tasks == bench.tasks:
        return TaskSetup(tasks, None, None)
    return TaskSetup(tasks, str(task_dir), task_config_hash(task_dir), local=True)


def evaluate_benchmark(lm: Any, setup: TaskSetup, limit: Any = None, output_dir: Path | None = None) -> dict[str, Any]:
    """``simple_evaluate`` of one benchmark's tasks with the plugin instance -> lmms-eval's results.
    Submission files some tasks write (TextVQA, OCRBench, MMBench) go under ``output_dir``."""
    task_manager = TaskManager("WARNING", include_path=setup.include_path, include_defaults=not setup.local,
                               model_name=MODEL_NAME)
    cli_args = argparse.Namespace(output_path=str(output_dir) if output_dir else None, process_with_media=True)
    return simple_evaluate(model=lm, tasks=list(setup.tasks), limit=limit, task_manager=task_manager,
                           log_samples=True, verbosity="WARNING", bootstrap_iters=0, cli_args=cli_args)


def write_samples(results: dict[str, Any], out: Path) -> None:
    """Per-sample outputs (doc id, target, response) for paired comparisons across methods."""
    out.mkdir(parents=True, exist_ok=True)
    for task, samples in (results.get("samples") or {}).items():
        with open(out / f"{task}.jsonl", "w") as f:
            for s in samples:
                f.write(json.dumps({"doc_id": s.get("doc_id"), "target": s.get("target"),
                                    "response": s.get("filtered_resps")}, default=str) + "\n")


def task_hash(results: dict[str, Any], tasks: tuple[str, ...]) -> str:
    configs = {t: results.get("configs", {}).get(t) for t in tasks}
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def eval_signature(data: Mapping[str, Any] | None, bench: Benchmark, limit: Any, revision: str | None = None) -> str:
    """What a cell's value depends on besides its key: the checkpoint, the benchmark config, the
    sample limit and, for the local synthetic task, the data it is generated from (``data``). A
    stored record is reused only when its signature matches, so a changed test split is never
    answered by a stale record."""
    synthetic = TASK_NAME in bench.tasks
    doc = {"tasks": list(bench.tasks), "limit": limit, "data": dict(data) if synthetic and bench.dataset_path and data else None,
           "model_revision": revision}
    if not synthetic and (bench.dataset_path or not bench.judge):  # a local copy, or judge-free scoring
        doc.update(dataset_path=bench.dataset_path, judge=bench.judge)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_done(store: ResultsStore, cell: dict[str, Any], metrics: Any, signature: str) -> bool:
    for metric in metrics:
        if not any(r.extra.get("eval_signature") == signature for r in store.records(**cell, metric=metric)):
            return False
    return True
