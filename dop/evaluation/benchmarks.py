"""The benchmark registry: one YAML per benchmark in ``conf/benchmark/`` (the Hydra group is the registry).

A benchmark names lmms-eval tasks, the metric the paper reports (``metric``; ``sum_of`` for MME's
perception + cognition), the metrics recorded (``metrics``), and what it needs beyond the model:
``needs_api_key`` (an environment variable, e.g. a GPT judge) and ``needs_server``. A suite
(``paper13``) lists ``members``. ``dataset_path`` points a benchmark at a local copy of its dataset
and ``judge: false`` scores a GPT-judged benchmark (MMBench) with lmms-eval's rule-based matcher
instead (then no key is needed); ``dop.evaluation.local_tasks`` writes the derived lmms-eval tasks.

    resolve("pope")      # -> [Benchmark(name="pope", tasks=["pope"], metric="pope_f1_score", ...)]
    resolve("paper13")   # -> 13 Benchmarks; raises before running if a judge key is missing
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dop.errors import DopError
from dop.evaluation.tasks import default_paths

BENCHMARK_DIR = Path(__file__).resolve().parents[2] / "conf" / "benchmark"


class BenchmarkError(DopError, ValueError):
    """Unknown benchmark, or a benchmark that cannot run here (missing API key or server)."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    tasks: tuple[str, ...]
    metric: str
    metrics: tuple[str, ...] = ()
    sum_of: tuple[str, ...] = ()
    limit: int | float | None = None
    needs_api_key: str | None = None
    needs_server: bool = False
    dataset_path: str | None = None
    judge: bool = True
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def recorded_metrics(self) -> tuple[str, ...]:
        """Every metric the stage records: the listed ones plus the headline (e.g. ``mme_total``)."""
        names = list(self.metrics or (self.metric,))
        if self.metric not in names:
            names.append(self.metric)
        return tuple(names)

    def metric_values(self, task_results: Mapping[str, Mapping[str, Any]],
                      task_names: Sequence[str] | None = None) -> dict[str, float]:
        """{metric: value} from ``simple_evaluate(...)["results"]`` (keys ``"<metric>,none"``).

        With several tasks (a group) the values are averaged over the tasks that report the metric.
        ``task_names``: the tasks that ran, when they are not ``self.tasks`` (local copies run as
        ``dop_local_<task>``, see ``dop.evaluation.local_tasks.benchmark_tasks``).
        """
        ran = tuple(task_names) if task_names is not None else self.tasks
        values: dict[str, float] = {}
        for name in self.metrics or (self.metric,):
            found = [float(r[f"{name},none"]) for t, r in task_results.items()
                     if t in ran and isinstance(r.get(f"{name},none"), (int, float))]
            if found:
                values[name] = sum(found) / len(found)
        if self.sum_of and all(m in values for m in self.sum_of):
            values[self.metric] = sum(values[m] for m in self.sum_of)
        return values

    def check_runnable(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        if self.needs_api_key and self.judge and not env.get(self.needs_api_key):
            raise BenchmarkError(
                f"benchmark {self.name!r} needs the environment variable {self.needs_api_key} "
                f"(an API judge: {self.notes or 'see conf/benchmark/' + self.name + '.yaml'}); set it, "
                f"score without the judge (benchmark.judge=false), or drop the benchmark"
            )
        if self.needs_server:
            raise BenchmarkError(f"benchmark {self.name!r} is scored by an online server: {self.notes}")


def known() -> list[str]:
    return sorted(p.stem for p in BENCHMARK_DIR.glob("*.yaml"))


def _load_raw(name: str) -> dict[str, Any]:
    path = BENCHMARK_DIR / f"{name}.yaml"
    if not path.is_file():
        raise BenchmarkError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(known())}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]


def from_mapping(d: Mapping[str, Any]) -> Benchmark:
    fields = {"name", "tasks", "metric", "metrics", "sum_of", "limit", "needs_api_key", "needs_server",
              "dataset_path", "judge", "notes"}
    dataset_path = d.get("dataset_path")
    if isinstance(dataset_path, str) and "${" in dataset_path:
        # Unresolved Hydra interpolation (file read outside a composed config): use the default layout.
        dataset_path = str(default_paths()[0])
    return Benchmark(
        name=str(d["name"]), tasks=tuple(d["tasks"]), metric=str(d["metric"]),
        metrics=tuple(d.get("metrics") or ()), sum_of=tuple(d.get("sum_of") or ()), limit=d.get("limit"),
        needs_api_key=d.get("needs_api_key"), needs_server=bool(d.get("needs_server", False)),
        dataset_path=dataset_path, judge=bool(d.get("judge", True)), notes=str(d.get("notes") or ""),
        extra={k: v for k, v in d.items() if k not in fields},
    )


def resolve(name: str | Mapping[str, Any], *, check: bool = True,
            env: Mapping[str, str] | None = None) -> list[Benchmark]:
    """The benchmarks behind a name (or a composed ``cfg.benchmark`` mapping); suites expand.

    ``check`` raises ``BenchmarkError`` for a missing API key or a server-scored benchmark, so a job
    fails before loading any model. A ``limit`` or ``judge`` on a suite applies to each member; a
    suite's ``dataset_path`` is a folder holding each member's local copy as ``<dataset_path>/<member>``.
    """
    d = dict(name) if isinstance(name, Mapping) else _load_raw(str(name))
    if "members" in d:
        out = []
        for member in d["members"]:
            m = _load_raw(str(member))
            for key in ("limit", "judge"):
                if d.get(key) is not None:
                    m[key] = d[key]
            if d.get("dataset_path") is not None:
                m["dataset_path"] = str(Path(str(d["dataset_path"])) / str(member))
            out.append(from_mapping(m))
    else:
        if "tasks" not in d or "metric" not in d:
            raise BenchmarkError(f"benchmark config {d.get('name')!r} needs 'tasks' and 'metric' (or 'members')")
        out = [from_mapping(d)]
    if check:
        for b in out:
            b.check_runnable(env)
    return out


def headline_metrics() -> dict[str, str]:
    """{benchmark name: the metric the paper reports} for every single benchmark (the report's columns)."""
    out = {}
    for name in known():
        d = _load_raw(name)
        if "metric" in d:
            out[str(d["name"])] = str(d["metric"])
    return out
