"""``dop stage=evaluate``: run benchmarks through lmms-eval with the dop plugin and record the results.

    dop stage=evaluate                                   # dense tiny_llava on the synthetic benchmark
    dop stage=evaluate policy=outputs/runs/tiny_llava/search/policies/ratio_0.5.yaml
    dop stage=evaluate policy=<dir of policies> benchmark=paper13 model=llava15_7b

    dop stage=evaluate method=fastv budget=tokens budget.values=[192,128,64]   # a baseline, 3 budgets

For each policy (none = dense), or each budget of a baseline (``method=<name>``; ``check_model`` runs
first), every benchmark in one ``simple_evaluate`` each (a fixed ``TaskManager(model_name="dop")`` so
every method gets the same prompts). Budgets hold per evaluated sample (``dop.evaluation.per_sample``,
``dop.stages.sample_budgets``): a searched DOP policy is re-solved on each sample's group sizes, a
baseline's knob matched on them (``budget.match=flops``) or set to its published knob for the token
count (``nominal``; ``both`` runs each), so every sample's prefill FLOPs sit at or just below its
own budget. A budget unreachable on the model's sample prompt fails before anything runs; samples
found unreachable during the run run at the cheapest setting and are named. Prefill latency and
peak memory are measured on each benchmark's first ``latency_samples`` samples, batch 1. One
``Record`` per (benchmark, metric) goes to the results store, its ``tflops`` the mean per-sample
TFLOPs and ``extra["per_sample_flops"]`` the distribution; a failing benchmark is logged and the
others still get their records. W&B mirrors the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dop.adapters import get_adapter
from dop.budget import Budget
from dop.engine.baselines import Method, MethodError
from dop.engine.baselines.budget import nominal_match, resolve_method
from dop.evaluation.benchmarks import Benchmark
from dop.evaluation.disjoint import OverlapError, check_disjoint
from dop.evaluation.per_sample import latency_summary, summarize
from dop.evaluation.plugin import DopLMM
from dop.evaluation.runner import (
    baseline_specs,
    checkpoint_hash,
    eval_signature,
    evaluate_benchmark,
    is_done,
    peak_memory,
    policy_specs,
    task_hash,
    task_setup,
    write_samples,
)
from dop.evaluation.scoring import group_sizes, sample_inputs
from dop.flops import count_flops, flops_unit, format_flops, text_shape
from dop.io import atomic_write_json
from dop.models import load_model, resolve_device
from dop.report import policy_heatmap
from dop.results import Record, RecordError, ResultsStore, git_sha, library_versions
from dop.stages.config import POLICY_METHODS, BaselineMethodConfig, EvaluateStage, load
from dop.stages.sample_budgets import baseline_resolver, policy_resolver
from dop.stages.schema import ConfigError
from dop.stages.search import check_budgets
from dop.stages.sweep import set_threads
from dop.tracking import log_metrics, log_table, start_run

log = logging.getLogger("dop.evaluate")


@dataclass
class Session:
    """What every cell of one evaluate run shares: the model, its sample prompt, the store."""

    conf: EvaluateStage
    model: Any
    processor: Any
    model_id: str
    revision: str | None
    groups: dict[str, int]  # the model's sample prompt: the pre-flight check of baseline budgets
    store: ResultsStore
    run_dir: Path
    batch_size: int
    versions: dict[str, str] = field(default_factory=library_versions)
    sha: str | None = field(default_factory=git_sha)
    summary: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    solvers: dict[str, Any] = field(default_factory=dict)  # search dir -> its per-shape DOP solver

    @property
    def unit(self) -> str:
        """The SI prefix this model's prefill FLOPs read in (MFLOPs on the embedded model, T on 7B)."""
        return flops_unit([count_flops(self.model.config, self.groups)])

    def flops(self, tflops: float | None) -> str:
        return "-" if tflops is None else format_flops(tflops * 1e12, self.unit, digits=4 if self.unit == "" else 2)


def run(cfg: DictConfig) -> dict[str, Any]:
    """``dop stage=evaluate``."""
    return execute(load(EvaluateStage, cfg), config=cfg)


def baseline_of(conf: EvaluateStage) -> Method | None:
    """The baseline ``method=`` selects (an unknown name lists the known ones), or None for
    dop/dense (policy files or dense)."""
    if not isinstance(conf.method, BaselineMethodConfig) or conf.method.name in POLICY_METHODS:
        return None
    try:
        return resolve_method(conf.method.name, **conf.method.hparams)
    except MethodError as err:
        raise ConfigError(f"method={conf.method.name}: {err}") from None


def execute(conf: EvaluateStage, config: Any = None) -> dict[str, Any]:
    set_threads(conf.num_threads)
    if conf.latency_samples < 0:
        raise ConfigError(f"latency_samples={conf.latency_samples} is not valid; it must be >= 0")
    benchmarks = conf.benchmarks  # a missing API key fails here, before loading a model
    baseline = baseline_of(conf)
    if baseline is not None and conf.policy not in (None, "", "none", "dense"):
        raise ConfigError(f"method={baseline.name} is a baseline: its knob comes from budget=, not a policy "
                          "(drop policy=, or use method=dop)")
    specs = policy_specs(conf.policy) if baseline is None else []
    _check_calibration(conf, specs, benchmarks)  # policies searched on an evaluated split: before any model loads
    session = _session(conf)
    if baseline is not None:
        baseline.check_model(session.model)  # e.g. a CLIP text tower the model lacks: say so before evaluating
        specs = _baseline_specs(session, baseline)
    with start_run(conf.logger, "evaluate", session.run_dir, config) as wb:
        for spec in specs:
            _evaluate_spec(session, spec, benchmarks, wb)
        cols = ["benchmark", "method", "budget", "metric", "value", "tflops", "samples"]
        rows = [[s["benchmark"], s["method"], f"{s['budget_kind']}={s['budget_value']}", s["metric"],
                 s["value"], s["tflops"], s["samples"]] for s in session.summary]
        log_table(wb, "eval/results", cols, rows)
    return _finish(session)


def _check_calibration(conf: EvaluateStage, specs: list[dict[str, Any]], benchmarks: list[Benchmark]) -> None:
    """Refuse policies whose recorded calibration data (``meta.calibration``) is a split one of
    ``benchmarks`` evaluates, unless ``data.allow_overlap``."""
    if conf.data.allow_overlap:
        return
    for spec in specs:
        source = (spec["policy"].meta or {}).get("calibration") if spec["policy"] is not None else None
        if source:
            try:
                check_disjoint(source, benchmarks, f"<policy {spec['path']}>")
            except OverlapError as err:
                raise ConfigError(str(err)) from None


def _session(conf: EvaluateStage) -> Session:
    store = ResultsStore(conf.paths.results_dir)
    try:
        store.check_writable()  # before loading a model: the evaluations would be lost
    except RecordError as err:
        raise ConfigError(str(err)) from None
    device = resolve_device(conf.device)
    model, processor = load_model(conf.model.pretrained, dtype=conf.model.dtype,
                                  attn_implementation=conf.model.attn_implementation, device=device)
    inputs = sample_inputs(model, processor, system=conf.model.system_prompt)
    return Session(conf=conf, model=model, processor=processor, model_id=conf.model.name,
                   revision=conf.model.revision or checkpoint_hash(conf.model.pretrained),
                   groups=group_sizes(model, inputs["input_ids"]), store=store,
                   run_dir=Path(conf.paths.run_dir),
                   batch_size=int(conf.benchmark.batch_size or conf.eval_batch_size or 8))


def _baseline_specs(session: Session, baseline: Method) -> list[dict[str, Any]]:
    """The baseline at every budget and match mode, each resolved per sample. A budget unreachable on
    the model's sample prompt is reported (the others still run)."""
    conf = session.conf
    check_budgets(conf.budgets, session.model.config, session.groups, model=session.model_id)
    unreachable: list[str] = []
    modes = ["flops", "nominal"] if conf.budget.match == "both" else [conf.budget.match]
    specs = []
    if "flops" in modes:  # pre-flight: matched once on the sample prompt, as before per-sample budgets
        for spec in baseline_specs(baseline, session.model, session.groups, conf.budgets, unreachable):
            m = spec["match"]
            log.info("%s at %s on the sample prompt: %s=%s, %s (budget %s)%s", baseline.name, spec["tag"],
                     m.knob_name, m.knob, session.flops(m.tflops), session.flops(m.budget_flops / 1e12),
                     f", {session.flops(m.paper_tflops)} in the {m.paper_convention} convention" if m.paper_flops
                     else "")
            if m.next_flops is None and m.flops < 0.99 * m.budget_flops:
                log.warning("%s: budget %s exceeds the cost of every %s value on the sample prompt; it runs at the "
                            "most expensive one (%s=%s, %s)", baseline.name, spec["tag"], m.knob_name, m.knob_name,
                            m.knob, session.flops(m.tflops))
            specs.append({**spec, "mode": "flops"})
    if "nominal" in modes:
        reference_rows = get_adapter(session.model).reference_rows
        for budget in conf.budgets:
            try:
                nominal_match(baseline, session.model.config, session.groups, budget, reference_rows=reference_rows)
            except MethodError as err:
                unreachable.append(f"{baseline.name} at {budget.name} (nominal): {err}")
                continue
            specs.append({"policy": None, "path": None, "budget_kind": budget.kind, "budget_value": budget.value,
                          "method": baseline, "tag": f"{budget.name}_nominal", "mode": "nominal"})
    if unreachable and not specs:
        raise MethodError(unreachable[0])
    for err in unreachable:
        log.error("skipped: %s", err)
    session.failures.extend(unreachable)
    for spec in specs:
        spec["resolver"] = baseline_resolver(baseline, session.model, Budget(spec["budget_kind"], spec["budget_value"]),
                                             spec["mode"], conf.budget.reference_groups)
    return specs


def _record_hash(method: Method, spec: dict[str, Any]) -> str:
    """The record's ``policy_hash`` for a baseline: its name, hyper-parameters, match mode and budget
    (its knob is resolved per sample)."""
    blob = json.dumps({"method": method.name, "hparams": method.hparams, "match": spec["mode"],
                       "budget": [spec["budget_kind"], spec["budget_value"]]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _evaluate_spec(session: Session, spec: dict[str, Any], benchmarks: list[Benchmark], wb: Any) -> None:
    """Every benchmark of one policy (or dense, or one baseline budget)."""
    conf, model = session.conf, session.model
    policy, base = spec["policy"], spec.get("method")
    method = base.name if base is not None else (  # a policy file may name its method (e.g. uniform depth)
        "dense" if policy is None else policy.meta.get("method") or conf.method.name)
    num_layers = text_shape(model.config).num_layers
    if policy is not None:
        policy.validate(num_layers)
        png = policy_heatmap(policy, num_layers, sorted(session.groups),
                             session.run_dir / "policies" / f"{Path(spec['path']).stem}.png")
        wb.log_image("policy/heatmap", png)
    resolver = spec.get("resolver") or policy_resolver(spec, model, conf.budget.reference_groups, session.solvers,
                                                     session.model_id)
    lm = DopLMM.from_model(model, session.processor, policy=policy, method=base, resolver=resolver,
                           batch_size=session.batch_size, name=session.model_id,
                           latency_samples=conf.latency_samples, system_prompt=conf.model.system_prompt)
    method_extra: dict[str, Any] = {"resolver": type(resolver).__name__}
    if base is not None:
        method_extra.update(match=spec["mode"], knob_name=base.knob, paper_convention=base.paper_convention,
                            hparams=dict(base.hparams), model_args=f"pretrained={conf.model.pretrained},method={base.name},"
                            f"budget={spec['budget_kind']}:{spec['budget_value']:g},match={spec['mode']}")
    p_hash = _record_hash(base, spec) if base is not None else (policy.digest() if policy is not None else None)
    for bench in benchmarks:
        cell = dict(model=session.model_id, method=method, policy_hash=p_hash, budget_kind=spec["budget_kind"],
                    budget_value=spec["budget_value"], benchmark=bench.name)
        try:
            _evaluate_cell(session, lm, spec, bench, cell, method_extra, wb)
        except Exception as err:  # one benchmark's failure must not lose the others' records
            session.failures.append(f"{bench.name} ({method}): {err}")
            log.error("benchmark %s failed:\n%s", bench.name, traceback.format_exc())


def _measured(session: Session, lm: DopLMM, first_sample: int) -> dict[str, Any]:
    """The record's FLOPs and latency fields from the samples served since ``first_sample``."""
    model = session.model
    flops = summarize(lm.samples[first_sample:], model.config)
    latency = latency_summary([x["seconds"] for x in lm.latency])
    peaks = [x["peak_memory_bytes"] for x in lm.latency if x.get("peak_memory_bytes") is not None]
    paper = [e.resolution.paper_flops for e in lm.samples[first_sample:]]
    return {"tflops": flops.get("mean_tflops"), "equivalent_tokens": flops.get("mean_equivalent_tokens"),
            "prefill_latency_s": latency.get("median"), "per_sample_flops": flops, "prefill_latency": latency,
            "prefill_peak_memory_bytes": max(peaks) if peaks else None,
            "paper_tflops": sum(paper) / len(paper) / 1e12 if paper and None not in paper else None}


def _evaluate_cell(session: Session, lm: DopLMM, spec: dict[str, Any], bench: Benchmark, cell: dict[str, Any],
                   method_extra: dict[str, Any], wb: Any) -> None:
    """One benchmark of one spec: lmms-eval, then one record per metric (skipped when stored)."""
    conf = session.conf
    limit = conf.benchmark.limit if conf.benchmark.limit is not None else bench.limit
    signature = eval_signature(dataclasses.asdict(conf.data), bench, limit, session.revision, conf.model.system_prompt)
    if not conf.overwrite and is_done(session.store, cell, bench.recorded_metrics, signature):
        log.info("skip %s / %s: already in the store", bench.name, cell["method"])
        return
    setup = task_setup(bench, session.run_dir, conf.data)
    before, first_sample = lm.stats["model_seconds"], len(lm.samples)
    lm.latency = []  # timed on this benchmark's own first samples
    lm.meter.reset()
    if session.model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results = evaluate_benchmark(lm, setup, limit, output_dir=session.run_dir / "lmms_eval")
    total_s = lm.stats["model_seconds"] - before
    values = bench.metric_values(results["results"], task_names=setup.tasks)
    if not values:
        raise RuntimeError(f"no metric of {bench.recorded_metrics} in lmms-eval results {sorted(results['results'])}")
    samples = sum(v["effective"] for t, v in results.get("n-samples", {}).items() if t in setup.tasks)
    measured = _measured(session, lm, first_sample)
    tag = cell["method"] + (f"_{Path(spec['path']).stem}" if spec["path"] else "") \
        + (f"_{spec['tag']}" if spec.get("tag") else "")
    write_samples(results, session.run_dir / "samples" / tag)
    flops = measured["per_sample_flops"]
    if flops.get("unreachable"):
        session.failures.append(
            f"{bench.name} ({cell['method']} at {cell['budget_kind']}={cell['budget_value']:g}"
            f"{', ' + spec['mode'] if spec.get('mode') == 'nominal' else ''}): {flops['unreachable']} of "
            f"{flops['n']} samples unreachable (ran at the cheapest setting, up to {flops['max_share']:.3f} of "
            f"dense; their budgets average {flops['mean_budget_share']:.3f})")
    extra = {**method_extra, "knob": _top_knob(flops), "paper_tflops": measured["paper_tflops"],
             "budget_tflops": flops.get("mean_budget_tflops"), "per_sample_flops": flops, "prefill_latency": measured["prefill_latency"],
             "prefill_peak_memory_bytes": measured["prefill_peak_memory_bytes"]}
    for metric, value in values.items():
        rec = Record(**cell, metric=metric, value=value, model_revision=session.revision, tflops=measured["tflops"],
                     equivalent_tokens=measured["equivalent_tokens"], samples=samples,
                     prefill_latency_s=measured["prefill_latency_s"], total_latency_s=total_s,
                     peak_memory_bytes=peak_memory(session.model.device), versions=session.versions,
                     git_sha=session.sha, task_config_hash=setup.config_hash or task_hash(results, setup.tasks),
                     extra={"policy_path": spec["path"], "limit": conf.benchmark.limit, "tasks": list(bench.tasks),
                            "eval_signature": signature, "groups": session.groups,
                            "measured_groups": lm.meter.mean(), "batch_size": session.batch_size,
                            "latency_samples": conf.latency_samples, **extra})
        path = save_record(session, rec)
        session.summary.append({**cell, "metric": metric, "value": value, "tflops": measured["tflops"],
                                "samples": samples, "record": str(path), "knob": extra.get("knob"),
                                "paper_tflops": extra.get("paper_tflops"), "match": spec.get("mode"),
                                "mean_share": flops.get("mean_share")})
        log_metrics(wb, {f"eval/{bench.name}/{metric}/{tag}": value})


def _top_knob(flops: dict[str, Any]) -> Any:
    """The most frequent knob (or policy) of a cell's samples, for the report's Knob column."""
    knobs = flops.get("knobs") or {}
    if not knobs:
        return None
    label = next(iter(knobs))
    try:
        value = json.loads(label)
    except ValueError:
        value = label
    return value if len(knobs) == 1 else f"{label} (+{flops['distinct_knobs'] - 1} more)"


def save_record(session: Session, rec: Record, attempts: int = 3) -> Path:
    """Append to the store, retrying; when the store stays unwritable (full disk, lost mount), the
    record goes beside the run instead, so the evaluation is never lost, and the failure is reported."""
    for attempt in range(attempts):
        try:
            return session.store.append(rec)
        except OSError as err:
            error = err
            time.sleep(0.5 * (attempt + 1))
    path = session.run_dir / "unsaved_records" / f"{rec.benchmark}__{rec.method}__{len(session.summary)}.json"
    atomic_write_json(path, rec.to_dict(), default=str)
    session.failures.append(f"record {rec.benchmark}/{rec.metric} ({rec.method}) not stored in {session.store.root} "
                            f"({error}); kept at {path}")
    log.error("results store %s failed (%s): the record is kept at %s", session.store.root, error, path)
    return path


def _finish(session: Session) -> dict[str, Any]:
    session.run_dir.mkdir(parents=True, exist_ok=True)
    result = {"records": session.summary, "failures": session.failures}
    (session.run_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    for s in session.summary:
        budget = "-" if s["budget_kind"] is None else f"{s['budget_kind']}={s['budget_value']:g}"
        share = "" if s.get("mean_share") is None else f", {s['mean_share']:.3f} of dense"
        match = " (nominal)" if s.get("match") == "nominal" else ""
        log.info("%s %s%s %s: %s = %.4f (n=%s, %s%s%s)", s["benchmark"], s["method"], match, budget, s["metric"],
                 s["value"], s["samples"], session.flops(s["tflops"]), share,
                 f", knob {s['knob']}" if s.get("knob") is not None else "")
    for f in session.failures:
        log.warning("not evaluated: %s", f)
    if session.failures and session.conf.fail_on_error:
        raise RuntimeError(f"{len(session.failures)} benchmark(s) or budget(s) failed (records of the others were "
                           "kept): " + "; ".join(session.failures))
    return result
