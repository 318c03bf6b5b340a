"""Found policies against simple policies of the same FLOPs: uniform depth and random depths.

A search result is only worth something if it beats the obvious alternatives in the same policy
space at the same cost. For a budget, ``reference_policies`` builds

- ``uniform``: every searched pair at one depth D (the largest-FLOPs D within the budget);
- ``random_i``: depth policies drawn at random (uniform depths per pair) whose FLOPs fall in
  ``[lo * budget, budget]``,

and ``compare_on_synthetic`` scores them with the found policy on the synthetic test split.
``python -m dop.compare <run dir>`` does this for a finished ``dop`` (pipeline) run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dop.flops import count_flops
from dop.policy import DepthPolicy, Policy
from dop.search import parse_pair

Pair = tuple[str, str]


def reference_policies(
    text_config: Any,
    groups: Mapping[str, float],
    pairs: Sequence[Pair],
    num_layers: int,
    budget_flops: float,
    n_random: int = 5,
    lo: float = 0.9,
    seed: int = 0,
    max_draws: int = 200_000,
) -> dict[str, tuple[Policy, float]]:
    """``{name: (policy, flops)}``: the uniform-depth policy and ``n_random`` random ones."""
    out: dict[str, tuple[Policy, float]] = {}
    for depth in range(num_layers, -1, -1):  # the deepest (cheapest pruning) uniform depth that fits
        policy = DepthPolicy({p: depth for p in pairs}).expand(num_layers)
        flops = count_flops(text_config, groups, policy)
        if flops <= budget_flops:
            out["uniform"] = (policy, flops)
            break
    rng = np.random.default_rng(seed)
    found = 0
    for _ in range(max_draws):
        depths = {p: int(rng.integers(0, num_layers + 1)) for p in pairs}
        policy = DepthPolicy(depths).expand(num_layers)
        flops = count_flops(text_config, groups, policy)
        if lo * budget_flops <= flops <= budget_flops:
            out[f"random_{found}"] = (policy, flops)
            found += 1
            if found == n_random:
                break
    return out


def compare_on_synthetic(
    model: Any,
    processor: Any,
    dataset: Any,
    policies: Mapping[str, Policy | None],
    limit: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Test-split exact-match accuracy of each policy (``None`` = dense)."""
    from dop.evaluation.scoring import score_synthetic

    return {name: score_synthetic(model, processor, dataset, policy=policy, batch_size=batch_size,
                                  limit=limit)["accuracy"] for name, policy in policies.items()}


def compare_run(run_dir: str | Path, dataset: str | Path, limit: int | None = None, n_random: int = 5,
                seed: int = 0) -> dict[str, Any]:
    """For every budget of a finished search: found vs uniform vs random policies, same FLOPs."""
    from dop.models import load_model

    run_dir = Path(run_dir)
    search = json.loads((run_dir / "search.json").read_text())
    model, processor = load_model(str(search["model"]))
    text_config = model.config.get_text_config(decoder=True)
    pairs = [parse_pair(p) for p in search["pairs"]]
    L, groups = int(search["num_layers"]), search["groups"]
    report: dict[str, Any] = {"dense": compare_on_synthetic(model, processor, dataset, {"dense": None}, limit)["dense"]}
    for name, entry in search["budgets"].items():
        budget = float(entry["budget"]["flops"])
        refs = reference_policies(text_config, groups, pairs, L, budget, n_random=n_random, seed=seed)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a finished pipeline/search run directory (holds search.json)")
    ap.add_argument("--dataset", default="outputs/data/synthetic")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--random", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    report = compare_run(args.run_dir, args.dataset, limit=args.limit, n_random=args.random)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
