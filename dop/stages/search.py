"""``dop stage=search``: the divergence sweep (when its store is incomplete), then one solve per
budget; writes ``<run>/policies/<budget>.yaml`` and ``<run>/search.json``.

    dop stage=search budget=ratio budget.values=[0.5,0.35,0.25]
    dop stage=search method.solver=greedy                   # GSOP-style greedy on the same sweep
    dop stage=search method.objective=accuracy              # GSOP's greedy on calibration accuracy
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from dop.budget import Budget
from dop.evaluation.disjoint import OverlapError, check_disjoint
from dop.evaluation.scoring import calibration_accuracy, calibration_answers
from dop.flops import (
    FlopsError,
    count_flops,
    equivalent_tokens,
    flops_for_tokens,
    flops_unit,
    format_flops,
    num_layers,
)
from dop.io import atomic_write_json
from dop.models import resolve_device
from dop.ops import OP_TYPES, VISION
from dop.policy import DEFAULT_OUTPUT_GROUPS, DepthPolicy, Policy
from dop.report import policy_heatmap
from dop.search import (
    AccuracyFn,
    SearchProblem,
    Solution,
    Solver,
    accuracy_greedy_search,
    check_additive,
    greedy_search,
    predict_kl,
    random_depth_policies,
    solve_exact,
)
from dop.space import grid_depths, pair_key
from dop.stages import store
from dop.stages.config import SearchStage, benchmarks_of, load
from dop.stages.schema import ConfigError
from dop.stages.sweep import build_job, calibration_set, set_threads
from dop.sweep import SweepJob
from dop.tracking import log_metrics, log_table, start_run

log = logging.getLogger("dop.search")


def run(cfg: DictConfig) -> dict[str, Any]:
    """``dop stage=search``."""
    return execute(load(SearchStage, cfg), config=cfg)


def execute(conf: SearchStage, job: SweepJob | None = None, config: Any = None) -> dict[str, Any]:
    """Sweep if needed and solve every budget (``job``: an already built sweep job, solved in its run dir).

    Without ``job`` the search lives in the search store (``dop.stages.store``): computed once under
    a lock, reused when it holds every budget's policy, linked into the run dir. The calibration data
    is loaded and checked against the configured benchmarks (``check_disjoint``) before the model."""
    set_threads(conf.num_threads)
    if conf.method.n_v and conf.method.objective == "accuracy":
        raise ConfigError("method.n_v is searched on the KL objective (its curve comes from the sweep); "
                          "set method.n_v=null with method.objective=accuracy")
    if job is not None:
        return _solve(job, conf, config)
    where = store.location(conf)
    with where.lock():
        found = where.done(conf)
        if found is not None:
            log.info("search reused from the store: %s", where.search_dir)
            disjoint(conf, found.get("calibration") or {})
        else:
            calibration = calibration_set(conf)
            disjoint(conf, calibration.source)
            sweep = dataclasses.replace(conf.sweep, run_dir=str(where.search_dir),
                                        dir=str(where.sweep_dir) if where.sweep_dir else None)
            local = dataclasses.replace(conf, sweep=sweep)
            found = _solve(build_job(local, calibration), local, config)
            where.write_identity()
    where.link(conf.paths.run_dir)
    return {**found, "search_dir": str(where.search_dir)}


def disjoint(conf: SearchStage, source: Mapping[str, Any]) -> None:
    """Refuse calibration data that a configured benchmark evaluates (``data.allow_overlap`` allows it)."""
    if conf.data.allow_overlap or not source:
        return
    try:
        check_disjoint(source, benchmarks_of(conf.benchmark, check=False), conf.data.name)
    except OverlapError as err:
        raise ConfigError(str(err)) from None


def _solve(job: SweepJob, conf: SearchStage, config: Any = None) -> dict[str, Any]:
    check_budgets(conf.budgets, job.text_config, job.flops_groups(), convention=conf.method.convention,
                  model=conf.model.name)  # before any sweep point: hours on a 7B model
    if conf.method.objective == "accuracy":
        calibration_answers(job.calibration_samples)  # fail before any model work
    else:  # GSOP's objective needs no sweep (its KL breaks ties when a sweep is present)
        job.run(complete=True)
    return search(job, conf, config)


def check_budgets(budgets: list[Budget], text_config: Any, groups: Mapping[str, float], *, convention: str = "dop",
                  model: str = "the model", output_groups: tuple[str, ...] = DEFAULT_OUTPUT_GROUPS) -> None:
    """Refuse a budget above the dense prefill or below the cheapest sensible policy (every operation
    skipped from layer 0 except the answer position's group in layer 0: below it the decoder is
    skipped outright), and a token budget above the visual tokens; warn about a TFLOPs budget that
    is a small share of dense (one meant for another model?). ``ConfigError`` states the valid range."""
    dense = count_flops(text_config, groups, convention=convention)
    types = [t.value for t in OP_TYPES]
    floor_policy = DepthPolicy({(t, g): (1 if g in output_groups else 0) for g in groups for t in types})
    floor = count_flops(text_config, groups, floor_policy.expand(num_layers(text_config)), convention=convention)
    unit = flops_unit([dense])

    def show(x: float) -> str:
        return f"{format_flops(x, unit, digits=3)} ({x / dense:.1%} of dense)"

    valid = f"valid: {show(floor)} .. {format_flops(dense, unit, digits=3)}"
    vision = groups.get(VISION)
    for budget in budgets:
        label = f"budget={budget.kind} budget.values=[{budget.value:g}]"
        if budget.kind == "tokens" and vision is not None and budget.value > vision:
            raise ConfigError(f"{label} keeps more visual tokens than {model}'s images have ({vision:g} on these "
                              f"prompts); valid: 0..{vision:g}")
        target = budget.to_flops(dense, lambda k: flops_for_tokens(text_config, groups, k, convention=convention))
        if target > dense * (1 + 1e-9):
            raise ConfigError(f"{label} is {format_flops(target, unit, digits=3)}, above {model}'s dense prefill; {valid}")
        if target < floor:
            raise ConfigError(f"{label} is {show(target)}, below the cheapest sensible policy (every operation "
                              f"skipped from layer 0 but the answer position's group's in layer 0); {valid}")
        if budget.kind == "tflops" and target < 0.1 * dense:
            log.warning("%s is only %.2g%% of %s's dense prefill (%s): a budget meant for another model?", label,
                        100 * target / dense, model, format_flops(dense, unit, digits=3))


def search(job: SweepJob, conf: SearchStage, config: Any = None) -> dict[str, Any]:
    """Solve every budget on a finished sweep; measure, write the policies and ``search.json``."""
    method = conf.method
    problem = SearchProblem(job.text_config, job.flops_groups(), job.pairs, _curves(job, conf),
                            convention=method.convention, nv_curve=job.nv_curve(), nv_full=job.nv_full,
                            reducer=job.reducer)
    solver_name, solver = _solver(job, conf)
    results = _header(job, conf, problem, solver_name)
    policies: dict[str, Policy] = {}
    for budget in conf.budgets:
        target = problem.budget_flops(budget)
        sol = problem.solve(target, solver)
        policies[budget.name], results["budgets"][budget.name] = _entry(job, conf, problem, budget, target, sol)
    checks = _check_policies(job, conf, problem)
    to_measure = dict(policies) if method.measure else {}
    to_measure.update({name: policy for name, (policy, _) in checks.items()})
    measured = job.measure_many(to_measure) if to_measure else {}
    for name, policy in policies.items():
        _write_policy(job, conf, name, policy, results["budgets"][name], measured.get(name), solver_name)
    if checks:
        pts = [(predicted, measured[name]) for name, (_, predicted) in checks.items()]
        results["additive_check"] = {**check_additive(pts), "points": pts}
    run_dir = Path(job.run_dir)
    atomic_write_json(run_dir / "search.json", results, indent=2, default=float)
    _mirror(conf, run_dir, results, policies, config)
    return results


def _curves(job: SweepJob, conf: SearchStage) -> dict | None:
    if conf.method.objective == "accuracy":
        try:  # KL only breaks accuracy ties and gives predicted_kl: used when a sweep is present
            return job.store.curves(job.pairs, job.num_layers, job.reference.fingerprint)
        except ValueError:
            return None
    return job.store.curves(job.pairs, job.num_layers, job.reference.fingerprint)


def _solver(job: SweepJob, conf: SearchStage) -> tuple[str, Solver]:
    if conf.method.objective != "accuracy":
        return conf.method.solver, {"exact": solve_exact, "greedy": greedy_search}[conf.method.solver]
    # GSOP: greedy on calibration accuracy (method.solver does not apply)
    scorer = accuracy_scorer(job, conf)
    grid = grid_depths(job.num_layers, job.grid_step)

    def solve(curves: Any, cost: Any, target: float) -> Solution:
        return accuracy_greedy_search(scorer, cost, target, grid=grid, curves=curves)

    return "greedy", solve


def _header(job: SweepJob, conf: SearchStage, problem: SearchProblem, solver: str) -> dict[str, Any]:
    results: dict[str, Any] = {"model": job.model_id, "num_layers": job.num_layers, "groups": problem.groups,
                               "pairs": [pair_key(p) for p in job.pairs], "convention": conf.method.convention,
                               "dense_flops": problem.cost.dense, "fingerprint": job.reference.fingerprint,
                               "solver": solver, "objective": conf.method.objective, "seed": conf.seed,
                               "calibration": calibration_record(job), "flops_groups": dict(problem.groups),
                               "budgets": {},
                               "sweep_store": str(job.store.root)}  # the curves, for per-sample re-solves
    if problem.nv_curve:
        results["n_v"] = {"reducer": job.reducer, "full": job.nv_full,
                          "curve": {str(v): k for v, k in sorted(problem.nv_curve.items())}}
    return results


def calibration_record(job: SweepJob) -> dict[str, Any]:
    """The calibration data of a search: source, sample count, seed, the selected ids, and the
    measured mean tokens per group of its prompts."""
    record = job.calibration.record() if job.calibration is not None else {
        "ids": job.reference.sample_ids, "num_samples": len(job.reference.sample_ids)}
    return {**record, "group_sizes": job.measured_groups()}


def _entry(job: SweepJob, conf: SearchStage, problem: SearchProblem, budget: Budget, target: float,
           sol: Solution) -> tuple[Policy, dict[str, Any]]:
    """The budget's policy and its ``search.json`` entry (exact FLOPs of the expanded policy)."""
    L, convention = job.num_layers, conf.method.convention
    depth_policy = sol.depth_policy(L, job.model_id)
    policy = depth_policy.expand(L)
    exact = count_flops(job.text_config, problem.groups, policy, convention=convention)
    entry = {
        "budget": {"kind": budget.kind, "value": budget.value, "flops": target},
        "depths": depth_policy.to_dict()["depths"],  # attn parameters appear as q and kv
        "parameters": {pair_key(p): d for p, d in sorted(sol.depths.items())},
        "n_v": sol.n_v, "reducer": sol.reducer,
        "predicted_kl": sol.predicted_kl, "measured_kl": None,
        "flops": exact, "tflops": exact / 1e12, "ratio": exact / problem.cost.dense,
        "equivalent_tokens": _equivalent_tokens(job.text_config, problem.groups, exact, convention),
        "solver_seconds": sol.stats.get("seconds"),
    }
    if problem.nv_curve:
        entry.update(depth_kl=sol.stats["depth_kl"], n_v_kl=sol.stats["n_v_kl"],
                     n_v_candidates=sol.stats["n_v_candidates"])
    if conf.method.objective == "accuracy":
        entry.update(calibration_accuracy=sol.stats["accuracy"], dense_calibration_accuracy=sol.stats["dense_accuracy"],
                     accuracy_evaluations=sol.stats["evaluations"], greedy_trace=sol.stats["trace"])
    return policy, entry


def _check_policies(job: SweepJob, conf: SearchStage, problem: SearchProblem) -> dict[str, tuple[Policy, float]]:
    """``method.check_additive`` random depth policies (each with a random ``n_v`` under a front end)
    and their predicted KL, measured in the same Lightning predict as the found policies."""
    if problem.curves is None or not conf.method.check_additive:
        return {}
    checks = random_depth_policies(job.pairs, job.num_layers, conf.method.check_additive, seed=conf.seed)
    rng = np.random.default_rng(conf.seed + 1)
    nv = problem.nv_curve
    draws = [int(rng.choice(sorted(nv))) if nv else None for _ in checks]
    draws = [None if v is None or v >= job.nv_full else v for v in draws]
    out = {}
    for i, (depths, v) in enumerate(zip(checks, draws)):
        policy = DepthPolicy(depths, n_v=v, reducer=job.reducer if v is not None else None).expand(job.num_layers)
        out[f"check_{i}"] = (policy, predict_kl(problem.curves, depths) + (nv[v] if v is not None else 0.0))
    return out


def _write_policy(job: SweepJob, conf: SearchStage, name: str, policy: Policy, entry: dict[str, Any],
                  measured: float | None, solver: str) -> None:
    entry["measured_kl"] = measured
    policy.meta = {**policy.meta, "budget": entry["budget"], "predicted_kl": entry["predicted_kl"],
                   "measured_kl": measured, "flops": entry["flops"], "ratio": entry["ratio"],
                   "fingerprint": job.reference.fingerprint, "objective": conf.method.objective, "solver": solver,
                   "calibration": calibration_record(job)}
    if "depth_kl" in entry:
        policy.meta.update(depth_kl=entry["depth_kl"], n_v_kl=entry["n_v_kl"])
    if conf.method.objective == "accuracy":
        policy.meta["calibration_accuracy"] = entry["calibration_accuracy"]
    path = Path(job.run_dir) / "policies" / f"{name}.yaml"
    policy.to_yaml(path)
    entry["policy"] = str(path)
    log.info("budget %s: %.1f%% of dense FLOPs, KL predicted %.3g measured %s%s", name, 100 * entry["ratio"],
             entry["predicted_kl"] if entry["predicted_kl"] is not None else float("nan"),
             "-" if measured is None else f"{measured:.3g}",
             f", n_v {entry['n_v']} ({entry['reducer']})" if entry["n_v"] is not None else "")
    log.debug("budget %s: depths %s", name, entry["depths"])


def _equivalent_tokens(text_config: Any, groups: Mapping[str, float], flops: float, convention: str) -> float | None:
    """Equivalent visual tokens, or None when the policy also prunes non-visual groups below
    their dense cost (no visual token count matches it)."""
    try:
        return float(equivalent_tokens(text_config, groups, flops, convention=convention))
    except FlopsError:
        return None


def accuracy_scorer(job: SweepJob, conf: SearchStage) -> AccuracyFn:
    """``calibration_accuracy`` bound to the job's model, processor and calibration samples; scores of
    policies already seen are reused (budgets share the greedy path)."""
    samples, processor = job.calibration_samples, job.processor
    max_new = conf.method.accuracy_max_new_tokens or (5 if conf.data.kind == "synthetic" else 16)
    model = job.model
    device = resolve_device(conf.device)
    if device.startswith("cuda"):
        model.to(device)
    model.eval()
    cache: dict[tuple, float] = {}

    def key(policy: Policy) -> tuple:
        return tuple(sorted((int(op.layer), str(op.group), str(op.type)) for op in policy))

    def score(policies: Mapping[str, Policy]) -> dict[str, float]:
        todo = {name: p for name, p in policies.items() if key(p) not in cache}
        if todo:
            for name, acc in calibration_accuracy(model, processor, samples, todo, batch_size=conf.sweep.batch_size,
                                                  max_new_tokens=max_new, system=conf.model.system_prompt).items():
                cache[key(todo[name])] = acc
        return {name: cache[key(p)] for name, p in policies.items()}

    return score


def _mirror(conf: SearchStage, run_dir: Path, results: Mapping[str, Any], policies: Mapping[str, Policy],
            config: Any) -> None:
    """Mirror the search to W&B (the run dir is the source of truth)."""
    with start_run(conf.logger, "search", run_dir, config) as wb:
        rows = []
        for name, entry in results["budgets"].items():
            log_metrics(wb, {f"search/{name}/predicted_kl": entry["predicted_kl"],
                             f"search/{name}/measured_kl": entry["measured_kl"],
                             f"search/{name}/ratio": entry["ratio"], f"search/{name}/tflops": entry["tflops"],
                             **({f"search/{name}/n_v": entry["n_v"]} if entry.get("n_v") is not None else {})})
            rows.append([name, entry["predicted_kl"], entry["measured_kl"], entry["ratio"], entry["tflops"],
                         json.dumps(entry["depths"]), entry.get("n_v")])
            if name in policies:
                png = policy_heatmap(policies[name], results["num_layers"], list(results["groups"]),
                                     run_dir / "policies" / f"{name}.png")
                wb.log_image(f"search/{name}/policy", png)
        log_table(wb, "search/budgets", ["budget", "predicted_kl", "measured_kl", "ratio", "tflops", "depths", "n_v"],
                  rows)
        check = results.get("additive_check")
        if check:
            log_metrics(wb, {"search/additive/pearson": check["pearson"], "search/additive/spearman": check["spearman"]})
