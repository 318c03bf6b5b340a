"""DOP's policy for one input shape: the search re-solved on a sample's own group sizes.

The search finds one depth policy per budget at the calibration set's mean group sizes. An evaluated
sample has its own sizes (another image size, another question length), and the same depths then
cost another share of its dense prefill. ``ShapeSolver`` re-solves the search on the sample's sizes
from the same sweep curves (the divergence of each parameter at each depth does not depend on the
FLOPs), with the same solver, so every sample's policy has the least predicted KL within that
sample's own budget; ``fill`` then deepens single parameters one layer at a time while the budget
still holds (never raising the predicted KL), so the policy's FLOPs sit within one depth step of the
budget: no single one-layer step of any parameter still fits. Solutions are cached per (sizes,
budget).

Per-layer costs: every decoder layer has the same shapes, so one layer's cost model (probed on a
one-layer copy of the text config through ``count_flops``, ``CostModel.from_flops``) tiles to all
``L`` layers exactly; this makes a new shape cost one layer's probes instead of ``L``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dop.flops import count_flops, front_end_groups, text_shape
from dop.policy import DepthPolicy, Policy
from dop.search.cost import CostModel
from dop.search.exact import solve_exact, solve_joint
from dop.search.greedy import greedy_search
from dop.search.solution import REL_TOL, SearchError, Solution
from dop.space import Pair, curves_array

SOLVERS = {"exact": solve_exact, "greedy": greedy_search}


def shape_cost_model(text_config: Any, groups: Mapping[str, float], pairs: Sequence[Pair],
                     convention: str = "dop") -> CostModel:
    """The exact cost model for these group sizes, from one layer's probes tiled to every layer."""
    shape = text_shape(text_config)
    one = CostModel.from_flops(dataclasses.replace(shape, num_layers=1), groups, pairs, convention=convention,
                               verify=2)
    L = shape.num_layers
    model = CostModel(L, list(one.pairs), np.tile(one.layer_costs, (L, 1)), one.dense * L, one.output_groups)
    dense = float(count_flops(shape, groups, convention=convention))
    if abs(model.dense - dense) > REL_TOL * max(dense, 1.0) * 10:
        raise SearchError(f"tiled cost model {model.dense:.6g} != count_flops {dense:.6g}: layers differ in shape")
    return model


def fill(depths: list[int], kl: np.ndarray, cost: CostModel, budget_flops: float) -> list[int]:
    """Deepen one parameter by one layer at a time while the budget holds and the predicted KL does not
    rise, taking the step of least KL (then the most FLOPs); stops when no such step fits."""
    depths = list(depths)
    limit = budget_flops * (1 + REL_TOL) + REL_TOL
    L = cost.num_layers
    while True:
        best = None
        for j, d in enumerate(depths):
            if d >= L or not np.isfinite(kl[j, d + 1]) or kl[j, d + 1] > kl[j, d]:
                continue
            trial = depths[:j] + [d + 1] + depths[j + 1:]
            c = cost.cost(trial)
            if c <= limit:
                key = (float(kl[j, d + 1] - kl[j, d]), -c)
                if best is None or key < best[0]:
                    best = (key, trial)
        if best is None:
            return depths
        depths = best[1]


class ShapeSolver:
    """The search of one budget, re-solved per input shape.

    ``curves``: the sweep's KL per pair at every depth 0..L; ``solver``: ``exact`` or ``greedy`` (the
    search's); ``nv_curve`` / ``nv_full`` / ``reducer``: the front end's curve (KL per ``n_v``) and the
    per-image count it was measured at, when the search had one.
    """

    def __init__(self, text_config: Any, pairs: Sequence[Pair], curves: Mapping[Pair, Sequence[float]], *,
                 solver: str = "exact", convention: str = "dop", nv_curve: Mapping[int, float] | None = None,
                 nv_full: int | None = None, reducer: str | None = None) -> None:
        if solver not in SOLVERS:
            raise SearchError(f"solver {solver!r} cannot be re-solved per shape; valid: {', '.join(SOLVERS)}")
        self.text_config, self.pairs, self.solver = text_config, list(pairs), SOLVERS[solver]
        self.kl = curves_array(curves, self.pairs)
        self.curves = dict(curves)
        self.convention = convention
        self.nv_curve = {int(k): float(v) for k, v in (nv_curve or {}).items()}
        self.nv_full, self.reducer = nv_full, reducer
        self.num_layers = text_shape(text_config).num_layers
        self._costs: dict[tuple, CostModel] = {}
        self._solutions: dict[tuple, Solution] = {}

    def cost_model(self, groups: Mapping[str, float]) -> CostModel:
        key = tuple(sorted(groups.items()))
        if key not in self._costs:
            self._costs[key] = shape_cost_model(self.text_config, groups, self.pairs, self.convention)
        return self._costs[key]

    def solve(self, groups: Mapping[str, int], budget_flops: float, num_images: int = 1) -> Solution:
        """The least-KL policy for a sample with these group sizes within ``budget_flops`` (filled to
        within one depth step). Raises ``InfeasibleBudgetError`` when even the cheapest does not fit."""
        groups = {str(g): int(n) for g, n in groups.items()}
        key = (tuple(sorted(groups.items())), float(budget_flops), int(num_images))
        if key not in self._solutions:
            self._solutions[key] = self._solve(groups, float(budget_flops), int(num_images))
        return self._solutions[key]

    def _solve(self, groups: dict[str, int], budget_flops: float, num_images: int) -> Solution:
        curve = self._nv_curve(groups, num_images)
        if not curve:
            cost = self.cost_model(groups)
            sol = self.solver(self.kl, cost, budget_flops)
            return self._filled(sol, cost, budget_flops, 0.0)
        full = max(curve)

        def cost_at(n_v: int) -> CostModel:
            reduced = front_end_groups(groups, Policy(n_v=n_v), num_images) if n_v < full else groups
            return self.cost_model(reduced)

        sol = solve_joint(self.solver, self.kl, curve, cost_at, budget_flops, full=full, reducer=self.reducer)
        n_v = sol.n_v if sol.n_v is not None else full
        return self._filled(sol, cost_at(n_v), budget_flops, curve[n_v])

    def _nv_curve(self, groups: Mapping[str, int], num_images: int) -> dict[int, float]:
        """The front end's values for this sample: those below its visual rows per image, and its own
        count (no reduction) at the KL the search measured for no reduction."""
        if not self.nv_curve:
            return {}
        rows = int(groups.get("vision", 0)) // max(num_images, 1)
        full_kl = self.nv_curve.get(int(self.nv_full), 0.0) if self.nv_full is not None else 0.0
        return {**{v: kl for v, kl in self.nv_curve.items() if v < rows}, rows: full_kl}

    def _filled(self, sol: Solution, cost: CostModel, budget_flops: float, nv_kl: float) -> Solution:
        depths = fill([sol.depths[p] for p in cost.pairs], self.kl, cost, budget_flops)
        kl = float(sum(self.kl[j, d] for j, d in enumerate(depths))) + nv_kl
        return Solution(dict(zip(cost.pairs, depths)), kl, cost.cost(depths), dict(sol.stats),
                        n_v=sol.n_v, reducer=sol.reducer)

    def cheapest(self, groups: Mapping[str, int], num_images: int = 1) -> Solution:
        """Every searched parameter pruned from layer 0 at the smallest ``n_v`` (an unreachable budget)."""
        groups = {str(g): int(n) for g, n in groups.items()}
        curve = self._nv_curve(groups, num_images)
        n_v = min(curve) if curve else None
        sized = front_end_groups(groups, Policy(n_v=n_v), num_images) if n_v is not None else groups
        cost = self.cost_model(sized)
        depths = [0] * len(cost.pairs)
        full = max(curve) if curve else None
        keep_nv = n_v is not None and n_v < full
        return Solution(dict(zip(cost.pairs, depths)), float(self.kl[:, 0].sum()) + (curve[n_v] if curve else 0.0),
                        cost.cost(depths), {}, n_v=n_v if keep_nv else None, reducer=self.reducer if keep_nv else None)

    def policy(self, sol: Solution) -> Policy:
        return DepthPolicy(dict(sol.depths), n_v=sol.n_v, reducer=sol.reducer).expand(self.num_layers)
