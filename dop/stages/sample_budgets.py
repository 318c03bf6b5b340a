"""The evaluate stage's per-sample resolvers (``dop.evaluation.per_sample``): how DOP's searched
policies and the baselines' knobs meet each evaluated sample's own budget.

DOP. A search writes one policy per budget, solved at the calibration set's mean group sizes, and
``search.json`` beside the ``policies/`` folder names the sweep store its curves came from. For each
evaluated sample the search is re-solved on that sample's group sizes from the same curves, with the
same solver and search space (``dop.search.per_shape.ShapeSolver``, cached per shape), so the policy
a sample runs has the least predicted KL within *its* budget and sits within one depth step of it.
When that is not possible (no ``search.json`` or sweep store, a search on calibration accuracy, a
splitter group the adapter does not produce) the searched policy runs as is, its per-sample FLOPs
recorded, and the reason is logged. A sample whose budget is below the cheapest policy of the space
runs the cheapest (every searched parameter pruned from layer 0) and is counted as unreachable.

Baselines. ``SampleMatcher`` per budget and match mode (``budget.match``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dop.adapters import get_adapter
from dop.budget import Budget
from dop.engine.baselines import Method
from dop.engine.baselines.budget import SampleMatcher
from dop.evaluation.per_sample import BaselineResolver, FixedResolver, PolicyResolver, Resolver
from dop.policy import Policy
from dop.search import InfeasibleBudgetError
from dop.search.per_shape import SOLVERS, ShapeSolver
from dop.space import parse_pair
from dop.sweep.store import SweepStore

log = logging.getLogger("dop.evaluate")


def baseline_resolver(method: Method, model: Any, budget: Budget, mode: str,
                      reference_groups: Mapping[str, float] | None = None) -> BaselineResolver:
    """A baseline's knob per sample at ``budget`` (``mode``: flops or nominal)."""
    reference_rows = get_adapter(model).reference_rows
    return BaselineResolver(SampleMatcher(method, model.config, budget, mode, reference_groups=reference_groups,
                                          reference_rows=reference_rows))


def shape_solver(search_dir: Path, model: Any) -> ShapeSolver:
    """The search of ``search_dir`` (its ``search.json`` and sweep store), ready to re-solve per shape.
    Raises ``ValueError`` naming what is missing."""
    path = search_dir / "search.json"
    if not path.is_file():
        raise ValueError(f"no {path}")
    doc = json.loads(path.read_text())
    if doc.get("objective", "kl") != "kl":
        raise ValueError(f"the search optimised calibration {doc.get('objective')} (no sweep curves to re-solve on)")
    if doc.get("solver") not in SOLVERS:
        raise ValueError(f"solver {doc.get('solver')!r} cannot be re-solved per shape")
    store = Path(doc.get("sweep_store") or search_dir / "sweep")
    if not (store / "meta.json").is_file():
        raise ValueError(f"no sweep store at {store}")
    pairs = [parse_pair(p) for p in doc["pairs"]]
    groups = set(get_adapter(model).group_names)
    foreign = sorted({g for _, g in pairs} - groups)
    if foreign:
        raise ValueError(f"searched group(s) {foreign} are not the adapter's groups {sorted(groups)}")
    curves = SweepStore(store).curves(pairs, int(doc["num_layers"]), doc.get("fingerprint"))
    nv = doc.get("n_v") or {}
    return ShapeSolver(model.config, pairs, curves, solver=doc["solver"], convention=doc.get("convention", "dop"),
                       nv_curve={int(k): float(v) for k, v in (nv.get("curve") or {}).items()},
                       nv_full=nv.get("full"), reducer=nv.get("reducer"))


def policy_resolver(spec: Mapping[str, Any], model: Any, reference_groups: Mapping[str, float] | None = None,
                    solvers: dict[str, ShapeSolver] | None = None) -> Resolver:
    """DOP's policy of ``spec`` re-solved per sample at its budget, or the policy as is (logged why)."""
    policy: Policy | None = spec["policy"]
    if policy is None or spec.get("budget_kind") is None:
        return FixedResolver(model.config, policy)
    search_dir = Path(spec["path"]).resolve().parent.parent  # <run>/policies/<budget>.yaml -> <run>
    solvers = {} if solvers is None else solvers
    try:
        if str(search_dir) not in solvers:
            solvers[str(search_dir)] = shape_solver(search_dir, model)
        solver = solvers[str(search_dir)]
    except (ValueError, OSError) as err:
        log.warning("%s: per-sample re-solve unavailable (%s); the searched policy runs on every sample",
                    spec["path"], err)
        return FixedResolver(model.config, policy)
    budget = Budget(spec["budget_kind"], spec["budget_value"])

    def solve(groups: Mapping[str, int], budget_flops: float, images: int) -> tuple[Policy, float, bool]:
        try:
            sol, reachable = solver.solve(groups, budget_flops, images), True
        except InfeasibleBudgetError:
            sol, reachable = solver.cheapest(groups, images), False
        return solver.policy(sol), sol.flops, reachable

    return PolicyResolver(model.config, budget, solve, reference_groups)
