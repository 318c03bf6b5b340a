"""``dop stage=bench``: prefill latency of policies and baselines next to their FLOPs, on a
real-width decoder slice with random weights (``dop.bench``; shape in ``conf/bench/default.yaml``).

    dop stage=bench num_threads=1                                     # DOP-style policies only
    dop stage=bench bench.methods=[fastv,pdrop,visionzip] bench.budget=tokens:128 num_threads=1
    dop stage=bench bench.methods=all            # every registered method, at budget's first value
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dop.bench import BenchRow, bench_text_tower, build_slice, format_rows, run_bench
from dop.budget import Budget, parse_budgets
from dop.engine.baselines import Method, MethodError, get_method, known_methods
from dop.engine.baselines.budget import match_budget, resolve_method
from dop.models import resolve_device
from dop.stages.config import BenchStage, baseline_method_config, budgets_of, load
from dop.stages.sweep import set_threads

log = logging.getLogger("dop.bench")


def run(cfg: DictConfig) -> list[BenchRow]:
    """``dop stage=bench``."""
    return execute(load(BenchStage, cfg))


def execute(conf: BenchStage) -> list[BenchRow]:
    """Time the policies (and ``bench.methods`` at one budget); write bench.json/md in the run dir."""
    set_threads(conf.num_threads)
    device = resolve_device(conf.device)
    dtype = getattr(torch, conf.bench.dtype)
    names = conf.bench.methods
    names = known_methods() if names in ("all", ["all"]) else [str(n) for n in (names or [])]
    budget = (parse_budgets(conf.bench.budget) if conf.bench.budget else budgets_of(conf.budget))[0] if names else None
    model, inputs, groups = build_slice(device=device, dtype=dtype, **conf.bench.slice_shape)
    methods, skipped = _methods(names, model, groups, budget)
    rows = run_bench(model, inputs, groups, repeats=conf.bench.repeats, methods=methods, skipped=skipped,
                     clock=conf.bench.clock)
    table = format_rows(rows)
    at = f", baselines at {budget.kind}={budget.value:g}" if budget is not None else ""
    print(f"engine benchmark ({device}, {torch.get_num_threads()} threads, {conf.bench.clock} clock{at})\n{table}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    out = Path(conf.paths.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str))
    notes = [f"baselines at {budget.kind}={budget.value:g} (knob by dop.engine.baselines.budget)"] if budget else []
    notes += [f"skipped {name}: {why}" for name, why in skipped.items()]
    (out / "bench.md").write_text(table + "\n" + "".join(f"\n{n}" for n in notes) + ("\n" if notes else ""))
    return rows


def _methods(names: list[str], model: Any, groups: dict[str, int], budget: Budget | None
             ) -> tuple[dict[str, tuple[Method, Any]], dict[str, str]]:
    """Each method with its knob at ``budget``; those that cannot run on the slice go to ``skipped``."""
    methods: dict[str, tuple[Method, Any]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            method = method_from_config(name)
            if getattr(method, "needs_text", False) and method.hparams.get("text_tower") is None:
                clip, tok = bench_text_tower(model)  # the slice has no CLIP text tower of its own
                method = get_method(name, **{**method.hparams, "text_tower": clip, "text_tokenizer": tok})
            method.check_model(model)
            methods[name] = (method, match_budget(method, model.config, groups, budget).knob)
        except MethodError as err:  # unknown names raise here too, listing the known ones
            if name not in known_methods():
                raise
            log.warning("bench: %s skipped: %s", name, err)
            skipped[name] = str(err)
    return methods, skipped


def method_from_config(name: str) -> Method:
    """A registered method with the hyper-parameters of ``conf/method/<name>.yaml`` (defaults if absent)."""
    method = baseline_method_config(name)
    return resolve_method(method.name, **method.hparams)
