"""``dop stage=evaluate``: run benchmarks through lmms-eval with the dop plugin and record the results.

    dop stage=evaluate                                   # dense tiny_llava on the synthetic benchmark
    dop stage=evaluate policy=outputs/runs/tiny_llava/search/policies/ratio_0.5.yaml
    dop stage=evaluate policy=<dir of policies> benchmark=paper13 model=llava15_7b

    dop stage=evaluate method=fastv budget=tokens budget.values=[192,128,64]   # a baseline, 3 budgets

For each policy (none = dense), or each budget of a baseline (``method=<name>``; its knob is matched
so its dop-convention prefill FLOPs are the largest not above the budget, ``dop.engine.baselines.budget``;
``check_model`` runs first): prefill TFLOPs and equivalent tokens of one sample, a prefill latency,
then every benchmark in one ``simple_evaluate`` each (a fixed ``TaskManager(model_name="dop")`` so every
method gets the same prompts). One ``Record`` per (benchmark, metric) goes to the results store;
a failing benchmark is logged and the others still get their records. W&B mirrors the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from dop.evaluation.benchmarks import Benchmark, resolve
from dop.results import Record, ResultsStore, git_sha, library_versions

log = logging.getLogger("dop.evaluate")

_BUDGET_FILE = re.compile(r"^(?P<kind>[a-z_]+)_(?P<value>[0-9.eE+-]+)$")


# --- inputs ----------------------------------------------------------------------------------------
def policy_specs(policy_arg: Any) -> list[dict[str, Any]]:
    """[{policy, path, budget_kind, budget_value}] from ``cfg.policy``: None (dense), a file, or a dir."""
    if policy_arg in (None, "", "none", "dense"):
        return [{"policy": None, "path": None, "budget_kind": None, "budget_value": None}]
    from dop.policy import Policy

    path = Path(str(policy_arg))
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no policy YAML in {path}")
    specs = []
    for f in files:
        pol = Policy.from_yaml(str(f))
        kind, value = _budget_of(pol, f)
        specs.append({"policy": pol, "path": str(f), "budget_kind": kind, "budget_value": value})
    return specs


# method names that mean "DOP's policies or dense" rather than a baseline from dop.engine.baselines
POLICY_METHODS: tuple[str, ...] = ("dop", "dense", "policy")


def baseline_of(method_cfg: Any):
    """The baseline ``Method`` that ``cfg.method`` selects, or None for dop/dense/policy.

    ``method.name`` is the registry key (``dop.engine.baselines``); the other keys are its hyper-parameters.
    An unknown name raises ``MethodError`` listing the known methods.
    """
    if not method_cfg:
        return None
    name = str(method_cfg.get("name", "dop"))
    if name in POLICY_METHODS:
        return None
    from dop.engine.baselines.budget import resolve_method

    return resolve_method(method_cfg)


def baseline_specs(method: Any, model: Any, groups: dict[str, int], budget_cfg: Any,
                   unreachable: list[str] | None = None) -> list[dict[str, Any]]:
    """One spec per budget of ``cfg.budget``: the method's knob matched to it on the sample prompt.

    Every budget is matched before anything is evaluated. An unreachable budget (``MethodError``
    naming the nearest reachable one) is appended to ``unreachable`` and the others still run; when
    no budget is reachable (or no list is given) the error is raised at once.
    """
    from dop.engine.baselines.base import MethodError
    from dop.engine.baselines.budget import match_budget
    from dop.budget import parse_budgets

    specs = []
    errors = []
    for budget in parse_budgets(budget_cfg):
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


def _knob_arg(knob: Any) -> str:
    """A knob as lmms-eval ``model_args`` text (``knob=128``, ``knob=[2,0.9]``; the plugin reads YAML)."""
    return str(knob) if isinstance(knob, (int, float, str)) else json.dumps(knob, separators=(",", ":"))


def _budget_of(policy: Any, path: Path) -> tuple[str | None, float | None]:
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
        from dop.models import resolve_path

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


SAMPLE_QUESTION = "what is in the image ?"


def sample_inputs(model: Any, processor: Any):
    """One prompt + grey image (the size the processor expects) for FLOPs and prefill latency."""
    from PIL import Image

    from dop.evaluation.scoring import build_prompt, encode

    image = Image.new("RGB", (336, 336), (128, 128, 128))
    prompt = build_prompt(processor, SAMPLE_QUESTION)
    return encode(processor, [[image]], [prompt], model.device, model.dtype)


def token_groups(model: Any, input_ids: torch.Tensor) -> dict[str, int]:
    """Group sizes of one unpadded sample, by the model's adapter (design.md section 3)."""
    from dop.adapters import get_adapter

    groups = get_adapter(model).token_groups(input_ids[:1])
    return {name: int(mask.sum()) for name, mask in groups.items()}


def flops_of(model: Any, groups: dict[str, int], policy: Any) -> tuple[float | None, float | None]:
    """(prefill TFLOPs, equivalent visual tokens) in the dop convention.

    The equivalent token count is None when a policy also cuts non-visual groups below their dense
    cost (no uniform visual-token count matches it); the TFLOPs are recorded regardless.
    """
    from dop.flops import FlopsError, count_flops, equivalent_tokens

    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    flops = count_flops(text_config, groups=groups, policy=policy, convention="dop")
    try:
        eq = equivalent_tokens(text_config, groups, flops) if groups.get("vision") else None
    except FlopsError as err:
        log.info("no equivalent token count: %s", err)
        eq = None
    return flops / 1e12, eq


def prefill_latency(model: Any, inputs: Any, policy: Any, repeats: int = 3, method: Any = None,
                    knob: Any = None) -> float:
    """Median wall time of one prefill forward (batch 1) under the policy (or a baseline ``method``
    at ``knob``: its ``prepare_inputs`` is timed too), after one warm-up."""
    from dop.evaluation.scoring import prepare, running

    times = []
    with torch.inference_mode(), running(model, policy, method, knob):
        for i in range(repeats + 1):
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**prepare(model, inputs, method, knob, policy, [SAMPLE_QUESTION]))
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except (ImportError, OSError):
        return None


def task_setup(bench: Benchmark, run_dir: Path, data_cfg: Any = None) -> tuple[str | None, str | None]:
    """(include_path, task config hash): dop's local tasks are written into ``<run_dir>/tasks``.

    A missing synthetic dataset is built with the data group's settings (``cfg.data``), so it matches
    what training and calibration use.
    """
    from dop.evaluation.tasks import TASK_NAME, default_paths, task_config_hash, write_task_dir

    if TASK_NAME not in bench.tasks:
        return None, None
    dataset = Path(bench.dataset_path or default_paths()[0])
    if not dataset.exists():
        from dop.data.synthetic import ensure_from_config

        dataset = Path(ensure_from_config(data_cfg if data_cfg is not None else {}, dataset))
    task_dir = write_task_dir(dataset, run_dir / "tasks")
    return str(task_dir), task_config_hash(task_dir)


def evaluate_benchmark(lm: Any, bench: Benchmark, include_path: str | None, limit: Any = None) -> dict[str, Any]:
    """``simple_evaluate`` of one benchmark with the plugin instance -> lmms-eval's results dict."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from dop.evaluation.plugin import MODEL_NAME

    task_manager = TaskManager("WARNING", include_path=include_path, model_name=MODEL_NAME)
    return simple_evaluate(model=lm, tasks=list(bench.tasks), limit=limit, task_manager=task_manager,
                           log_samples=True, verbosity="WARNING", bootstrap_iters=0)


def _write_samples(results: dict[str, Any], out: Path) -> None:
    """Per-sample outputs (doc id, target, response) for paired comparisons across methods."""
    out.mkdir(parents=True, exist_ok=True)
    for task, samples in (results.get("samples") or {}).items():
        with open(out / f"{task}.jsonl", "w") as f:
            for s in samples:
                f.write(json.dumps({"doc_id": s.get("doc_id"), "target": s.get("target"),
                                    "response": s.get("filtered_resps")}, default=str) + "\n")


def _task_hash(results: dict[str, Any], tasks: tuple[str, ...]) -> str:
    configs = {t: results.get("configs", {}).get(t) for t in tasks}
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def eval_signature(cfg: Any, bench: Benchmark, limit: Any, revision: str | None = None) -> str:
    """What a cell's value depends on besides its key: the checkpoint, the benchmark config, the
    sample limit and, for the local synthetic task, the data it is generated from. A stored record is reused only
    when its signature matches, so a changed test split is never answered by a stale record."""
    from omegaconf import OmegaConf

    def plain(x: Any) -> Any:
        return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x

    data = plain(cfg.get("data")) if bench.dataset_path else None
    doc = {"tasks": list(bench.tasks), "limit": limit, "data": data, "model_revision": revision}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _done(store: ResultsStore, cell: dict[str, Any], metrics: Any, signature: str) -> bool:
    for metric in metrics:
        if not any(r.extra.get("eval_signature") == signature for r in store.records(**cell, metric=metric)):
            return False
    return True


# --- the stage -----------------------------------------------------------------------------------
def run(cfg: Any) -> dict[str, Any]:
    from dop.evaluation.plugin import DopLMM, load_model_and_processor
    from dop.tracking import log_metrics, log_policy_heatmap, log_table, start_run

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    benchmarks = resolve(cfg.benchmark)  # a missing API key fails here, before loading a model
    limit = cfg.benchmark.get("limit")
    baseline = baseline_of(cfg.get("method"))  # an unknown method name fails here, listing the known ones
    if baseline is not None and cfg.get("policy") not in (None, "", "none", "dense"):
        raise ValueError(f"method={baseline.name} is a baseline: its knob comes from cfg.budget, not a policy "
                         f"(drop policy=, or use method=dop)")
    specs = policy_specs(cfg.get("policy")) if baseline is None else []
    run_dir = Path(cfg.paths.run_dir)
    store = ResultsStore(cfg.paths.results_dir)
    overwrite = bool(cfg.get("overwrite", False))
    device = str(cfg.get("device", "cpu"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    model, processor = load_model_and_processor(
        cfg.model.pretrained, dtype=cfg.model.get("dtype"),
        attn_implementation=cfg.model.get("attn_implementation", "sdpa"), device=device)
    model_id = str(cfg.model.get("name") or cfg.model.pretrained)
    revision = cfg.model.get("revision") or checkpoint_hash(str(cfg.model.pretrained))
    versions, sha = library_versions(), git_sha()
    inputs = sample_inputs(model, processor)
    groups = token_groups(model, inputs["input_ids"])
    num_layers = int(model.config.get_text_config().num_hidden_layers)
    method_name = str(cfg.get("method", {}).get("name", "dop")) if cfg.get("method") else "dop"
    unreachable: list[str] = []  # budgets a baseline cannot reach: reported, the others still run
    if baseline is not None:
        baseline.check_model(model)  # e.g. a CLIP text tower the model lacks: say so before any evaluation
        specs = baseline_specs(baseline, model, groups, cfg.get("budget"), unreachable)
        for err in unreachable:
            log.error("skipped: %s", err)
        for spec in specs:
            m = spec["match"]
            log.info("%s at %s: %s=%s, %.4g TFLOPs (budget %.4g)%s", baseline.name, spec["tag"], m.knob_name,
                     m.knob, m.tflops, m.budget_flops / 1e12,
                     f", {m.paper_tflops:.4g} T in the {m.paper_convention} convention" if m.paper_flops else "")
            if m.next_flops is None and m.flops < 0.99 * m.budget_flops:
                log.warning("%s: budget %s exceeds the cost of every %s value; it runs at the most expensive "
                            "one (%s=%s, %.4g TFLOPs)", baseline.name, spec["tag"], m.knob_name, m.knob_name,
                            m.knob, m.tflops)
    batch_size = int(cfg.benchmark.get("batch_size") or cfg.get("eval_batch_size") or 8)

    summary: list[dict[str, Any]] = []
    failures: list[str] = list(unreachable)
    with start_run(cfg, job_type="evaluate", run_dir=run_dir) as wb:
        for spec in specs:
            policy = spec["policy"]
            base, knob, match = spec.get("method"), spec.get("knob"), spec.get("match")
            method = base.name if base is not None else ("dense" if policy is None else method_name)
            if policy is not None:
                policy.validate(num_layers)
                log_policy_heatmap(wb, policy, num_layers, sorted(groups),
                                   path=run_dir / "policies" / f"{Path(spec['path']).stem}.png")
            if match is not None:
                tflops, eq_tokens = match.tflops, match.equivalent_tokens
            else:
                tflops, eq_tokens = flops_of(model, groups, policy)
            prefill_s = prefill_latency(model, inputs, policy, method=base, knob=knob)
            lm = DopLMM.from_model(model, processor, policy=policy, method=base, knob=knob,
                                   batch_size=batch_size, name=model_id)
            method_extra: dict[str, Any] = {}
            if base is not None:
                method_extra = {**match.as_dict(), "hparams": dict(base.hparams),
                                "model_args": f"pretrained={cfg.model.pretrained},method={base.name},"
                                              f"knob={_knob_arg(match.as_dict()['knob'])}"}
            if base is not None:
                p_hash = baseline_hash(base, knob)
            else:
                p_hash = policy.digest() if policy is not None else None
            for bench in benchmarks:
                cell = dict(model=model_id, method=method, policy_hash=p_hash,
                            budget_kind=spec["budget_kind"], budget_value=spec["budget_value"],
                            benchmark=bench.name)
                signature = eval_signature(cfg, bench, limit if limit is not None else bench.limit, revision)
                if not overwrite and _done(store, cell, bench.recorded_metrics, signature):
                    log.info("skip %s / %s: already in the store", bench.name, method)
                    continue
                try:
                    include_path, local_hash = task_setup(bench, run_dir, cfg.get("data"))
                    before = lm.stats["model_seconds"]
                    if device.startswith("cuda"):
                        torch.cuda.reset_peak_memory_stats()
                    results = evaluate_benchmark(lm, bench, include_path, limit if limit is not None else bench.limit)
                    total_s = lm.stats["model_seconds"] - before
                    values = bench.metric_values(results["results"])
                    if not values:
                        raise RuntimeError(f"no metric of {bench.recorded_metrics} in lmms-eval results "
                                           f"{sorted(results['results'])}")
                    samples = sum(v["effective"] for t, v in results.get("n-samples", {}).items() if t in bench.tasks)
                    tag = f"{method}" + (f"_{Path(spec['path']).stem}" if spec["path"] else "") \
                        + (f"_{spec['tag']}" if spec.get("tag") else "")
                    _write_samples(results, run_dir / "samples" / tag)
                    for metric, value in values.items():
                        rec = Record(**cell, metric=metric, value=value, model_revision=revision, tflops=tflops,
                                     equivalent_tokens=eq_tokens, samples=samples, prefill_latency_s=prefill_s,
                                     total_latency_s=total_s, peak_memory_bytes=peak_memory(model.device),
                                     versions=versions, git_sha=sha,
                                     task_config_hash=local_hash or _task_hash(results, bench.tasks),
                                     extra={"policy_path": spec["path"], "limit": limit, "tasks": list(bench.tasks),
                                            "eval_signature": signature,
                                            "groups": groups, "batch_size": batch_size, **method_extra})
                        path = store.append(rec)
                        summary.append({**cell, "metric": metric, "value": value, "tflops": tflops,
                                        "samples": samples, "record": str(path),
                                        "knob": method_extra.get("knob"),
                                        "paper_tflops": method_extra.get("paper_tflops")})
                        log_metrics(wb, {f"eval/{bench.name}/{metric}/{tag}": value})
                except Exception as err:  # one benchmark's failure must not lose the others' records
                    failures.append(f"{bench.name} ({method}): {err}")
                    log.error("benchmark %s failed:\n%s", bench.name, traceback.format_exc())
        cols = ["benchmark", "method", "budget", "metric", "value", "tflops", "samples"]
        rows = [[s["benchmark"], s["method"], f"{s['budget_kind']}={s['budget_value']}", s["metric"],
                 s["value"], s["tflops"], s["samples"]] for s in summary]
        log_table(wb, "eval/results", cols, rows)

    run_dir.mkdir(parents=True, exist_ok=True)
    result = {"records": summary, "failures": failures}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    for s in summary:
        budget = "-" if s["budget_kind"] is None else f"{s['budget_kind']}={s['budget_value']:g}"
        tf = "-" if s["tflops"] is None else f"{s['tflops']:.4g}"
        print(f"{s['benchmark']:>16} {s['method']:>8} {budget:>12} {s['metric']:>22} = {s['value']:.4f} "
              f"(n={s['samples']}, TFLOPs {tf}" + (f", knob {s['knob']}" if s.get("knob") is not None else "") + ")")
    for f in failures:
        print(f"FAILED {f}")
    if failures and bool(cfg.get("fail_on_error", True)):
        raise RuntimeError(f"{len(failures)} benchmark(s) or budget(s) failed (records of the others were kept): "
                           + "; ".join(failures))
    return result
