"""``dop stage=compare``: the found policies of a finished pipeline run against the obvious
alternatives at the same FLOPs (uniform depth, random depths), on the synthetic test split.

    dop stage=compare                                        # the default pipeline run dir
    dop stage=compare compare.run_dir=outputs/runs/tiny_llava/pipeline compare.random=5
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from dop.evaluation.scoring import compare_on_synthetic
from dop.flops import text_config
from dop.models import load_model
from dop.policy import Policy
from dop.search.reference import reference_policies
from dop.space import parse_pair
from dop.stages.config import CompareStage, load


def run(cfg: DictConfig) -> dict[str, Any]:
    """``dop stage=compare``."""
    conf = load(CompareStage, cfg)
    report = compare_run(conf.compare.run_dir, conf.data.path, limit=conf.compare.limit, n_random=conf.compare.random,
                         seed=conf.seed)
    text = format_report(report)
    print(text)
    out = Path(conf.paths.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    (out / "compare.md").write_text(text + "\n")
    return report


def compare_run(run_dir: str | Path, dataset: str | Path, limit: int | None = None, n_random: int = 5,
                seed: int = 0) -> dict[str, Any]:
    """For every budget of a finished search: found vs uniform vs random policies, same FLOPs."""
    run_dir = Path(run_dir)
    search = json.loads((run_dir / "search.json").read_text())
    model, processor = load_model(str(search["model"]))
    pairs = [parse_pair(p) for p in search["pairs"]]
    L, groups = int(search["num_layers"]), search["groups"]
    report: dict[str, Any] = {"dense": compare_on_synthetic(model, processor, dataset, {"dense": None}, limit)["dense"]}
    for name, entry in search["budgets"].items():
        budget = float(entry["budget"]["flops"])
        refs = reference_policies(text_config(model), groups, pairs, L, budget, n_random=n_random, seed=seed)
        policies = {"dop": Policy.from_yaml(entry["policy"]), **{k: p for k, (p, _) in refs.items()}}
        acc = compare_on_synthetic(model, processor, dataset, policies, limit)
        flops = {"dop": entry["flops"], **{k: f for k, (_, f) in refs.items()}}
        randoms = [v for k, v in acc.items() if k.startswith("random_")]
        report[name] = {"accuracy": acc, "ratio": {k: f / search["dense_flops"] for k, f in flops.items()},
                        "random_mean": float(np.mean(randoms)) if randoms else None,
                        "random_max": float(np.max(randoms)) if randoms else None}
    return report

def format_report(report: Mapping[str, Any]) -> str:
    lines = [f"dense accuracy {report['dense']:.3f}", "",
             "| budget | DOP (found) | uniform depth | random depths: mean | random: best | FLOPs ratio DOP / uniform |",
             "|---|---|---|---|---|---|"]
    for name, entry in report.items():
        if name == "dense":
            continue
        acc, ratio = entry["accuracy"], entry["ratio"]
        uni = acc.get("uniform")
        lines.append(f"| {name} | {acc['dop']:.3f} | {'-' if uni is None else f'{uni:.3f}'} | "
                     f"{_f(entry['random_mean'])} | {_f(entry['random_max'])} | "
                     f"{ratio['dop']:.3f} / {_f(ratio.get('uniform'))} |")
    return "\n".join(lines)

def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
