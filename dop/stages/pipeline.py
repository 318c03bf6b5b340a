"""The default stage: the whole DOP pipeline on one model, end to end, in one run directory.

    dop                                  # tiny_llava + synthetic data + ratio budgets 0.5/0.35/0.25
    dop model=llava15_7b benchmark=paper13 budget=tokens budget.values=[192,128,64]

Steps (each resumes from what is already there): the dense reference, the single-change divergence
sweep and the exact budgeted search, in the search store (``dop.stages.store``: one search per
model, calibration set, search space and budgets, shared by every benchmark cell; ``<run>/policies``
and ``<run>/search.json`` link to it), the evaluation of dense and of the stored policies through
the lmms-eval plugin (records in the results store), and the report of this run's records
(``<run>/report``). W&B gets one run for the whole job. A run directory made by another
configuration is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dop.data.synthetic import ensure_from_config
from dop.io import atomic_write_json
from dop.policy import Policy
from dop.results import ResultsStore
from dop.stages import evaluate, report, search
from dop.stages.config import PipelineStage, benchmarks_of, load
from dop.tracking import log_metrics, start_run

log = logging.getLogger("dop.pipeline")

# What a run directory's sweep and policies depend on; budgets and benchmarks may change freely.
_IDENTITY_KEYS = ("model", "data", "method.groups", "method.types", "method.pairs", "method.grid_step",
                  "method.num_calibration", "method.response_tokens", "method.objective", "seed")


class RunDirError(RuntimeError):
    """The run directory belongs to another configuration."""


def identity(conf: PipelineStage) -> dict[str, Any]:
    """The settings a run directory's sweep and policies depend on (``_IDENTITY_KEYS``)."""
    out = {}
    for key in _IDENTITY_KEYS:
        value: Any = conf
        for part in key.split("."):
            value = getattr(value, part)
        out[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def check_run_dir(run_dir: Path, conf: PipelineStage) -> dict[str, Any]:
    """Record this config's identity in ``<run>/pipeline.json``, or refuse a different one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "pipeline.json"
    mine = identity(conf)
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs.get("digest") != digest:
            diff = [k for k in mine if json.dumps(mine[k], sort_keys=True, default=str)
                    != json.dumps(theirs.get("identity", {}).get(k), sort_keys=True, default=str)]
            raise RunDirError(
                f"run directory {run_dir} was made by another configuration (differs in {', '.join(diff)}); "
                f"pass hydra.run.dir=<new dir> or remove it"
            )
    else:
        atomic_write_json(path, {"digest": digest, "identity": mine}, indent=2, default=str)
    return mine


def run(cfg: DictConfig) -> dict[str, Any]:
    """``dop`` / ``dop stage=pipeline``."""
    return execute(load(PipelineStage, cfg), config=cfg)


def execute(conf: PipelineStage, config: Any = None) -> dict[str, Any]:
    run_dir = Path(conf.paths.run_dir)
    check_run_dir(run_dir, conf)
    (run_dir / "command.txt").write_text(" ".join(sys.argv) + "\n")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with start_run(conf.logger, "pipeline", run_dir, config, outer=True) as wb:
        t = time.perf_counter()
        if conf.data.kind == "synthetic":
            ensure_from_config(conf.data)
        timings["data_s"] = time.perf_counter() - t

        t = time.perf_counter()
        print("[dop] 1/4 dense reference + divergence sweep + search")
        found = search.execute(conf.search_stage(str(run_dir)))
        timings["search_s"] = time.perf_counter() - t

        t = time.perf_counter()
        print("[dop] 2/4 evaluate dense")
        evaluate.execute(conf.evaluate_stage(str(run_dir / "evaluate" / "dense"), policy=None))
        print("[dop] 3/4 evaluate the found policies")
        policies = Path(found.get("search_dir") or run_dir) / "policies"  # the store's files, not the links
        evaluate.execute(conf.evaluate_stage(str(run_dir / "evaluate" / "policies"), policy=str(policies)))
        timings["evaluate_s"] = time.perf_counter() - t

        print("[dop] 4/4 report")
        # This run's cells, read back from the store: cells skipped as already done count too.
        records = run_records(conf, run_dir)
        report_filter = {"model": conf.model.name, "benchmark": sorted({r["benchmark"] for r in records}),
                         "policy_hash": sorted({r["policy_hash"] for r in records}, key=str)}
        paths = report.execute(conf.report_stage(str(run_dir / "report"), report_filter))
        timings["total_s"] = time.perf_counter() - started
        log_metrics(wb, {f"pipeline/{k}": v for k, v in timings.items()})

    summary = summarize(found, records)
    (run_dir / "summary.md").write_text(summary + "\n")
    (run_dir / "result.json").write_text(json.dumps(
        {"search": found, "records": records, "report": paths, "timings": timings}, indent=1, default=str))
    print("\n" + summary)
    print(f"\nrun directory: {run_dir}")
    print(f"  policies:  {run_dir / 'policies'}")
    print(f"  search:    {run_dir / 'search.json'}")
    print(f"  report:    {paths['markdown']}, {paths['csv']}, {paths['plot']}")
    print(f"  results:   {conf.paths.results_dir}")
    print(f"  took {timings['total_s']:.0f} s")
    return {"search": found, "records": records, "report": paths, "timings": timings}


def run_records(conf: PipelineStage, run_dir: Path) -> list[dict[str, Any]]:
    """The newest store records of this run: dense and the policies in ``<run>/policies``."""
    hashes = {None} | {Policy.from_yaml(p).digest() for p in sorted((run_dir / "policies").glob("*.yaml"))}
    benchmarks = {b.name for b in benchmarks_of(conf.benchmark, check=False)}
    latest = ResultsStore(conf.paths.results_dir).latest().values()
    return [dataclasses.asdict(r) for r in latest
            if r.model == conf.model.name and r.benchmark in benchmarks and r.policy_hash in hashes
            and (r.policy_hash is not None or r.method == "dense")]


def summarize(found: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """One row per method/budget: TFLOPs, share of dense, predicted and measured KL, metric values."""
    by_budget = {}
    for entry in found.get("budgets", {}).values():
        b = entry["budget"]
        by_budget[(b["kind"], float(b["value"]))] = entry
    metric_cols = sorted({f"{r['benchmark']}/{r['metric']}" for r in records})
    header = ["method", "budget", "TFLOPs", "of dense", "pred. KL", "meas. KL", *metric_cols]
    rows: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = (r["method"], r["budget_kind"], r["budget_value"])
        row = rows.setdefault(key, {"tflops": r["tflops"]})
        row[f"{r['benchmark']}/{r['metric']}"] = r["value"]
    dense_tflops = next((v["tflops"] for k, v in rows.items() if k[0] == "dense"), None)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = sorted(rows, key=lambda k: (k[0] != "dense", -(k[2] or 0)))
    for key in order:
        method, kind, value = key
        row = rows[key]
        entry = by_budget.get((kind, float(value))) if kind is not None else None
        share = (row["tflops"] / dense_tflops) if (dense_tflops and row["tflops"] is not None) else None
        cells = [method, "-" if kind is None else f"{kind} {value:g}",
                 _fmt(row["tflops"], ".4g"), _fmt(share, ".1%"),
                 _fmt(entry["predicted_kl"] if entry else None, ".4f"),
                 _fmt(entry["measured_kl"] if entry else None, ".4f")]
        cells += [_fmt(row.get(c), ".3f") for c in metric_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)
