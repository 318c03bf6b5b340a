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

The uniform-depth reference (a policy file whose ``meta.method`` is ``uniform``, the pipeline's
``<run>/uniform/``): per sample, every searched parameter at the deepest single depth that fits the
sample's budget. Other policy files (e.g. a transferred policy) run as they are.

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
from dop.flops import count_flops, text_shape
from dop.policy import DepthPolicy, Policy
from dop.search import InfeasibleBudgetError
from dop.search.per_shape import SOLVERS, ShapeSolver
from dop.search.reference import uniform_policy
from dop.space import parse_pair
from dop.sweep.store import SweepStore

log = logging.getLogger("dop.evaluate")


def baseline_resolver(method: Method, model: Any, budget: Budget, mode: str,
                      reference_groups: Mapping[str, float] | None = None) -> BaselineResolver:
    """A baseline's knob per sample at ``budget`` (``mode``: flops or nominal)."""
    reference_rows = get_adapter(model).reference_rows
    return BaselineResolver(SampleMatcher(method, model.config, budget, mode, reference_groups=reference_groups,
                                          reference_rows=reference_rows))


def _search_doc(search_dir: Path, model: Any, model_id: str | None) -> dict[str, Any]:
    """``search_dir``'s ``search.json``, when it searched this model (a transferred policy runs as is)."""
    path = search_dir / "search.json"
    if not path.is_file():
        raise ValueError(f"no {path}")
    doc = json.loads(path.read_text())
    if model_id is not None and doc.get("model") not in (None, model_id):
        raise ValueError(f"searched on {doc.get('model')}, evaluated on {model_id}")
    if int(doc["num_layers"]) != text_shape(model.config).num_layers:
        raise ValueError(f"searched on {doc['num_layers']} layers, the model has {text_shape(model.config).num_layers}")
    return doc


def shape_solver(search_dir: Path, model: Any, model_id: str | None = None) -> ShapeSolver:
    """The search of ``search_dir`` (its ``search.json`` and sweep store), ready to re-solve per shape.
    Raises ``ValueError`` naming what is missing."""
    doc = _search_doc(search_dir, model, model_id)
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


def uniform_resolver(search_dir: Path, model: Any, budget: Budget, reference_groups: Mapping[str, float] | None = None,
                     model_id: str | None = None) -> PolicyResolver:
    """The uniform-depth reference per sample: every searched parameter of ``search_dir``'s search at
    the deepest single depth whose FLOPs fit the sample's own budget (depth 0, unreachable, when none).
    Raises ``ValueError`` when the search is not there or was of another model."""
    doc = _search_doc(search_dir, model, model_id)
    pairs, num_layers = [parse_pair(p) for p in doc["pairs"]], int(doc["num_layers"])

    def solve(groups: Mapping[str, int], budget_flops: float, images: int) -> tuple[Policy, float, bool]:
        found = uniform_policy(model.config, groups, pairs, num_layers, budget_flops)
        if found is not None:
            return found[0], found[1], True
        policy = DepthPolicy({p: 0 for p in pairs}).expand(num_layers)
        return policy, float(count_flops(model.config, groups, policy, num_images=images)), False

    return PolicyResolver(model.config, budget, solve, reference_groups)


def policy_resolver(spec: Mapping[str, Any], model: Any, reference_groups: Mapping[str, float] | None = None,
                    solvers: dict[str, ShapeSolver] | None = None, model_id: str | None = None) -> Resolver:
    """The policy of ``spec`` per sample at its budget: a searched DOP policy (``<run>/policies/``)
    re-solved from the search's sweep curves, the uniform-depth reference (``meta.method: uniform``)
    at its deepest fitting depth; any other policy, or when the search cannot be re-solved, as is
    (logged why)."""
    policy: Policy | None = spec["policy"]
    if policy is None or spec.get("budget_kind") is None:
        return FixedResolver(model.config, policy)
    path = Path(spec["path"]).resolve()
    search_dir = path.parent.parent  # <run>/policies/<budget>.yaml -> <run>
    method = policy.meta.get("method")
    budget = Budget(spec["budget_kind"], spec["budget_value"])
    if method == "uniform":
        try:
            return uniform_resolver(search_dir, model, budget, reference_groups, model_id)
        except (ValueError, OSError, KeyError) as err:
            log.warning("%s: per-sample uniform depth unavailable (%s); the policy runs on every sample", path, err)
            return FixedResolver(model.config, policy)
    if method not in (None, "dop") or path.parent.name != "policies":
        log.warning("%s: not a searched DOP policy (method %s); it runs as is on every sample", path, method)
        return FixedResolver(model.config, policy)
    solvers = {} if solvers is None else solvers
    try:
        if str(search_dir) not in solvers:
            solvers[str(search_dir)] = shape_solver(search_dir, model, model_id)
        solver = solvers[str(search_dir)]
    except (ValueError, OSError, KeyError) as err:
        log.warning("%s: per-sample re-solve unavailable (%s); the searched policy runs on every sample",
                    spec["path"], err)
        return FixedResolver(model.config, policy)

    def solve(groups: Mapping[str, int], budget_flops: float, images: int) -> tuple[Policy, float, bool]:
        try:
            sol, reachable = solver.solve(groups, budget_flops, images), True
        except InfeasibleBudgetError:
            sol, reachable = solver.cheapest(groups, images), False
        return solver.policy(sol), sol.flops, reachable

    return PolicyResolver(model.config, budget, solve, reference_groups)
