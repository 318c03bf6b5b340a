"""``dop stage=evaluate``: run benchmarks through lmms-eval with the dop plugin and record the results.

    dop stage=evaluate                                   # dense tiny_llava on the synthetic benchmark
    dop stage=evaluate policy=outputs/runs/tiny_llava/search/policies/ratio_0.5.yaml
    dop stage=evaluate policy=<dir of policies> benchmark=paper13 model=llava15_7b

    dop stage=evaluate method=fastv budget=tokens budget.values=[192,128,64]   # a baseline, 3 budgets

For each policy (none = dense), or each budget of a baseline (``method=<name>``; its knob is matched
so its dop-convention prefill FLOPs are the largest not above the budget,
``dop.engine.baselines.budget``; ``check_model`` runs first): prefill TFLOPs and equivalent tokens
of one sample, a prefill latency, then every benchmark in one ``simple_evaluate`` each (a fixed
``TaskManager(model_name="dop")`` so every method gets the same prompts). One ``Record`` per
(benchmark, metric) goes to the results store; a failing benchmark is logged and the others still
get their records. W&B mirrors the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dop.engine.baselines import Method, MethodError
from dop.engine.baselines.budget import resolve_method
from dop.evaluation.benchmarks import Benchmark
from dop.evaluation.disjoint import OverlapError, check_disjoint
from dop.evaluation.plugin import DopLMM
from dop.evaluation.runner import (
    baseline_hash,
    baseline_specs,
    checkpoint_hash,
    eval_signature,
    evaluate_benchmark,
    flops_of,
    is_done,
    knob_arg,
    peak_memory,
    policy_specs,
    prefill_latency,
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
    inputs: Any  # the sample prompt: FLOPs and prefill latency
    groups: dict[str, int]
    store: ResultsStore
    run_dir: Path
    batch_size: int
    versions: dict[str, str] = field(default_factory=library_versions)
    sha: str | None = field(default_factory=git_sha)
    summary: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

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
                   revision=conf.model.revision or checkpoint_hash(conf.model.pretrained), inputs=inputs,
                   groups=group_sizes(model, inputs["input_ids"]), store=store,
                   run_dir=Path(conf.paths.run_dir),
                   batch_size=int(conf.benchmark.batch_size or conf.eval_batch_size or 8))


def _baseline_specs(session: Session, baseline: Method) -> list[dict[str, Any]]:
    """The baseline's knob at every budget; unreachable budgets are reported, the others still run."""
    check_budgets(session.conf.budgets, session.model.config, session.groups, model=session.model_id)
    unreachable: list[str] = []
    specs = baseline_specs(baseline, session.model, session.groups, session.conf.budgets, unreachable)
    for err in unreachable:
        log.error("skipped: %s", err)
    session.failures.extend(unreachable)
    for spec in specs:
        m = spec["match"]
        log.info("%s at %s: %s=%s, %s (budget %s)%s", baseline.name, spec["tag"], m.knob_name, m.knob,
                 session.flops(m.tflops), session.flops(m.budget_flops / 1e12),
                 f", {session.flops(m.paper_tflops)} in the {m.paper_convention} convention" if m.paper_flops else "")
        if m.next_flops is None and m.flops < 0.99 * m.budget_flops:
            log.warning("%s: budget %s exceeds the cost of every %s value; it runs at the most expensive "
                        "one (%s=%s, %s)", baseline.name, spec["tag"], m.knob_name, m.knob_name,
                        m.knob, session.flops(m.tflops))
    return specs


def _evaluate_spec(session: Session, spec: dict[str, Any], benchmarks: list[Benchmark], wb: Any) -> None:
    """Every benchmark of one policy (or dense, or one baseline budget)."""
    conf, model = session.conf, session.model
    policy, base, knob, match = spec["policy"], spec.get("method"), spec.get("knob"), spec.get("match")
    method = base.name if base is not None else (  # a policy file may name its method (e.g. uniform depth)
        "dense" if policy is None else policy.meta.get("method") or conf.method.name)
    num_layers = text_shape(model.config).num_layers
    if policy is not None:
        policy.validate(num_layers)
        png = policy_heatmap(policy, num_layers, sorted(session.groups),
                             session.run_dir / "policies" / f"{Path(spec['path']).stem}.png")
        wb.log_image("policy/heatmap", png)
    if match is not None:
        tflops, eq_tokens = match.tflops, match.equivalent_tokens
    else:
        tflops, eq_tokens = flops_of(model, session.groups, policy)
    prefill_s = prefill_latency(model, session.inputs, policy, method=base, knob=knob)
    lm = DopLMM.from_model(model, session.processor, policy=policy, method=base, knob=knob,
                           batch_size=session.batch_size, name=session.model_id, system_prompt=conf.model.system_prompt)
    method_extra: dict[str, Any] = {}
    if base is not None:
        method_extra = {**match.as_dict(), "hparams": dict(base.hparams),
                        "model_args": f"pretrained={conf.model.pretrained},method={base.name},"
                                      f"knob={knob_arg(match.as_dict()['knob'])}"}
    p_hash = baseline_hash(base, knob) if base is not None else (policy.digest() if policy is not None else None)
    measured = {"tflops": tflops, "equivalent_tokens": eq_tokens, "prefill_latency_s": prefill_s}
    for bench in benchmarks:
        cell = dict(model=session.model_id, method=method, policy_hash=p_hash, budget_kind=spec["budget_kind"],
                    budget_value=spec["budget_value"], benchmark=bench.name)
        try:
            _evaluate_cell(session, lm, spec, bench, cell, measured, method_extra, wb)
        except Exception as err:  # one benchmark's failure must not lose the others' records
            session.failures.append(f"{bench.name} ({method}): {err}")
            log.error("benchmark %s failed:\n%s", bench.name, traceback.format_exc())


def _evaluate_cell(session: Session, lm: DopLMM, spec: dict[str, Any], bench: Benchmark, cell: dict[str, Any],
                   measured: dict[str, Any], method_extra: dict[str, Any], wb: Any) -> None:
    """One benchmark of one spec: lmms-eval, then one record per metric (skipped when stored)."""
    conf = session.conf
    limit = conf.benchmark.limit if conf.benchmark.limit is not None else bench.limit
    signature = eval_signature(dataclasses.asdict(conf.data), bench, limit, session.revision, conf.model.system_prompt)
    if not conf.overwrite and is_done(session.store, cell, bench.recorded_metrics, signature):
        log.info("skip %s / %s: already in the store", bench.name, cell["method"])
        return
    setup = task_setup(bench, session.run_dir, conf.data)
    before = lm.stats["model_seconds"]
    lm.meter.reset()
    if session.model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results = evaluate_benchmark(lm, setup, limit, output_dir=session.run_dir / "lmms_eval")
    total_s = lm.stats["model_seconds"] - before
    values = bench.metric_values(results["results"], task_names=setup.tasks)
    if not values:
        raise RuntimeError(f"no metric of {bench.recorded_metrics} in lmms-eval results {sorted(results['results'])}")
    samples = sum(v["effective"] for t, v in results.get("n-samples", {}).items() if t in setup.tasks)
    tag = cell["method"] + (f"_{Path(spec['path']).stem}" if spec["path"] else "") \
        + (f"_{spec['tag']}" if spec.get("tag") else "")
    write_samples(results, session.run_dir / "samples" / tag)
    for metric, value in values.items():
        rec = Record(**cell, metric=metric, value=value, model_revision=session.revision, tflops=measured["tflops"],
                     equivalent_tokens=measured["equivalent_tokens"], samples=samples,
                     prefill_latency_s=measured["prefill_latency_s"], total_latency_s=total_s,
                     peak_memory_bytes=peak_memory(session.model.device), versions=session.versions,
                     git_sha=session.sha, task_config_hash=setup.config_hash or task_hash(results, setup.tasks),
                     extra={"policy_path": spec["path"], "limit": conf.benchmark.limit, "tasks": list(bench.tasks),
                            "eval_signature": signature, "groups": session.groups,
                            "measured_groups": lm.meter.mean(), "batch_size": session.batch_size, **method_extra})
        path = save_record(session, rec)
        session.summary.append({**cell, "metric": metric, "value": value, "tflops": measured["tflops"],
                                "samples": samples, "record": str(path), "knob": method_extra.get("knob"),
                                "paper_tflops": method_extra.get("paper_tflops")})
        log_metrics(wb, {f"eval/{bench.name}/{metric}/{tag}": value})


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
        log.info("%s %s %s: %s = %.4f (n=%s, %s%s)", s["benchmark"], s["method"], budget, s["metric"], s["value"],
                 s["samples"], session.flops(s["tflops"]), f", knob {s['knob']}" if s.get("knob") is not None else "")
    for f in session.failures:
        log.warning("not evaluated: %s", f)
    if session.failures and session.conf.fail_on_error:
        raise RuntimeError(f"{len(session.failures)} benchmark(s) or budget(s) failed (records of the others were "
                           "kept): " + "; ".join(session.failures))
    return result
