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
from dop.engine.baselines import MethodError
from dop.errors import DopError
from dop.flops import flops_unit, unit_scale
from dop.flops import text_config as text_config_of
from dop.io import atomic_write_json
from dop.models import load_config
from dop.policy import Policy
from dop.results import ResultsStore
from dop.search.reference import uniform_policy
from dop.space import parse_pair
from dop.stages import evaluate, report, search
from dop.stages.config import (
    DOP_METHODS,
    PipelineStage,
    baseline_method_config,
    benchmarks_of,
    budgets_of,
    load,
)
from dop.tracking import log_metrics, start_run

log = logging.getLogger("dop.pipeline")

# What a run directory's sweep and policies depend on; budgets and benchmarks may change freely.
_IDENTITY_KEYS = ("model", "data", "method.groups", "method.types", "method.pairs", "method.grid_step",
                  "method.num_calibration", "method.response_tokens", "method.objective", "seed")


class RunDirError(DopError, RuntimeError):
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
        try:
            theirs = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise RunDirError(f"{path} is not readable JSON ({err}); remove it, or pass hydra.run.dir=<new dir>") from None
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
    baselines = [baseline_method_config(name, conf.model) for name in conf.pipeline.baselines]
    steps = 4 + conf.pipeline.uniform + bool(baselines)
    step = iter(range(1, steps + 1))
    with start_run(conf.logger, "pipeline", run_dir, config, outer=True) as wb:
        t = time.perf_counter()
        if conf.data.kind == "synthetic":
            ensure_from_config(conf.data)
        timings["data_s"] = time.perf_counter() - t

        t = time.perf_counter()
        log.info("[%d/%d] dense reference, divergence sweep and search", next(step), steps)
        found = search.execute(conf.search_stage(str(run_dir)))
        timings["search_s"] = time.perf_counter() - t

        t = time.perf_counter()
        log.info("[%d/%d] evaluate dense", next(step), steps)
        evaluate.execute(conf.evaluate_stage(str(run_dir / "evaluate" / "dense"), policy=None))
        log.info("[%d/%d] evaluate DOP's policies", next(step), steps)
        policies = Path(found.get("search_dir") or run_dir) / "policies"  # the store's files, not the links
        evaluate.execute(conf.evaluate_stage(str(run_dir / "evaluate" / "policies"), policy=str(policies)))
        if conf.pipeline.uniform:
            log.info("[%d/%d] evaluate the uniform-depth policies of the same budgets", next(step), steps)
            write_uniform_policies(conf, found, run_dir / "uniform")
            evaluate.execute(conf.evaluate_stage(str(run_dir / "evaluate" / "uniform"), policy=str(run_dir / "uniform")))
        unreachable: list[str] = []
        if baselines:
            log.info("[%d/%d] evaluate the baselines at the same budgets: %s", next(step), steps,
                     ", ".join(m.name for m in baselines))
            for method in baselines:
                try:
                    out = evaluate.execute(conf.evaluate_stage(str(run_dir / "evaluate" / method.name), None, method))
                except MethodError as err:  # it reaches none of the budgets: the table says so, DOP's run stands
                    log.warning("%s: %s", method.name, err)
                    unreachable.append(f"{method.name}: {err}")
                    continue
                unreachable += out["failures"]
        timings["evaluate_s"] = time.perf_counter() - t

        log.info("[%d/%d] report", next(step), steps)
        # This run's cells, read back from the store: cells skipped as already done count too.
        records = run_records(conf, run_dir)
        report_filter = {"model": conf.model.name, "benchmark": sorted({r["benchmark"] for r in records}),
                         "record_id": sorted(r["record_id"] for r in records)}
        paths = report.execute(conf.report_stage(str(run_dir / "report"), report_filter), policies=run_dir / "policies")
        timings["total_s"] = time.perf_counter() - started
        log_metrics(wb, {f"pipeline/{k}": v for k, v in timings.items()})

    summary = summarize(found, records, unreachable)
    (run_dir / "summary.md").write_text(summary + "\n")
    (run_dir / "result.json").write_text(json.dumps(
        {"search": found, "records": records, "report": paths, "timings": timings, "unreachable": unreachable},
        indent=1, default=str))
    print("\n" + summary)
    print(f"\nrun directory: {run_dir}")
    print(f"  policies:  {run_dir / 'policies'}  (heatmaps: {run_dir / 'report'}/policy_*.png)")
    print(f"  search:    {run_dir / 'search.json'}")
    print(f"  report:    {paths['markdown']}, {paths['csv']}, {paths['plot']}")
    print(f"  results:   {conf.paths.results_dir}")
    print(f"  took {timings['total_s']:.0f} s")
    return {"search": found, "records": records, "report": paths, "timings": timings, "unreachable": unreachable}


def write_uniform_policies(conf: PipelineStage, found: dict[str, Any], out: Path) -> list[Path]:
    """Per budget of the search, the uniform-depth policy (every searched parameter at one depth, the
    deepest that fits the same FLOPs) as a policy file whose metadata names it ``uniform``."""
    text_config = text_config_of(load_config(conf.model.pretrained))
    pairs = [parse_pair(p) for p in found["pairs"]]
    paths = []
    for name, entry in found["budgets"].items():
        uniform = uniform_policy(text_config, found["groups"], pairs, found["num_layers"], entry["budget"]["flops"])
        if uniform is None:
            log.warning("uniform depth: no single depth fits budget %s", name)
            continue
        policy, flops = uniform
        depth = min((op.layer for op in policy), default=found["num_layers"])
        policy.meta = {"method": "uniform", "depth": depth, "budget": entry["budget"], "flops": flops,
                       "ratio": flops / found["dense_flops"]}
        paths.append(out / f"{name}.yaml")
        policy.to_yaml(paths[-1])
    return paths


def run_records(conf: PipelineStage, run_dir: Path) -> list[dict[str, Any]]:
    """The newest store records of this run: dense, the policies in ``<run>/policies`` and
    ``<run>/uniform``, and the configured baselines at this run's budgets."""
    files = [*(run_dir / "policies").glob("*.yaml"), *(run_dir / "uniform").glob("*.yaml")]
    hashes = {None} | {Policy.from_yaml(p).digest() for p in sorted(files)}
    benchmarks = {b.name for b in benchmarks_of(conf.benchmark, check=False)}
    budgets = {(b.kind, b.value) for b in budgets_of(conf.budget)}
    latest = ResultsStore(conf.paths.results_dir).latest().values()

    def mine(r: Any) -> bool:
        if r.model != conf.model.name or r.benchmark not in benchmarks:
            return False
        if r.method in conf.pipeline.baselines:
            return (r.budget_kind, r.budget_value) in budgets
        return r.policy_hash in hashes and (r.policy_hash is not None or r.method == "dense")

    return [dataclasses.asdict(r) for r in latest if mine(r)]


METHOD_ORDER = ("dense", *DOP_METHODS, "uniform")  # then the baselines, by name


def summarize(found: dict[str, Any], records: list[dict[str, Any]], unreachable: list[str] = ()) -> str:
    """One row per method and budget: FLOPs (in the SI unit the table reads best in) and share of
    dense, predicted and measured KL (DOP), the baseline's knob, metric values; budgets a baseline
    cannot reach are listed below the table."""
    by_budget = {}
    for entry in found.get("budgets", {}).values():
        b = entry["budget"]
        by_budget[(b["kind"], float(b["value"]))] = entry
    metric_cols = sorted({f"{r['benchmark']}/{r['metric']}" for r in records})
    rows: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = (r["method"], r["budget_kind"], r["budget_value"])
        row = rows.setdefault(key, {"tflops": r["tflops"], "knob": (r.get("extra") or {}).get("knob")})
        row[f"{r['benchmark']}/{r['metric']}"] = r["value"]
    flops = [v["tflops"] * 1e12 for v in rows.values() if v["tflops"] is not None]
    unit = flops_unit(flops) if flops else "T"
    dense_tflops = next((v["tflops"] for k, v in rows.items() if k[0] == "dense"), None)
    header = ["method", "budget", f"{unit}FLOPs", "of dense", "pred. KL", "meas. KL", "knob", *metric_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def order(key: tuple) -> tuple:
        method, kind, value = key
        rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
        return (kind is not None, -(value or 0), rank, method)

    for key in sorted(rows, key=order):
        method, kind, value = key
        row = rows[key]
        entry = by_budget.get((kind, float(value))) if kind is not None and method in DOP_METHODS else None
        share = (row["tflops"] / dense_tflops) if (dense_tflops and row["tflops"] is not None) else None
        amount = None if row["tflops"] is None else row["tflops"] * 1e12 / unit_scale(unit)
        cells = [method, "-" if kind is None else f"{kind} {value:g}", _fmt(amount, ".4g"), _fmt(share, ".1%"),
                 _fmt(entry["predicted_kl"] if entry else None, ".3g"),
                 _fmt(entry["measured_kl"] if entry else None, ".3g"),
                 "-" if row["knob"] is None or method in METHOD_ORDER else str(row["knob"])]  # baselines' knobs
        cells += [_fmt(row.get(c), ".3f") for c in metric_cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"\nnot reached: {u}" for u in unreachable]
    return "\n".join(lines)


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)
