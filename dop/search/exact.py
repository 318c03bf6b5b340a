"""The exact budgeted solver (label setting with Pareto dominance, feasibility and Lagrangian
bounds) and the joint (depths, ``n_v``) solve."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dop.search.cost import CostModel
from dop.search.solution import REL_TOL, InfeasibleBudgetError, SearchError, Solution
from dop.space import Pair, curves_array


class _Dag:
    """The layer DAG of one (curves, cost model) instance, with backward DPs over it."""

    def __init__(self, kl: np.ndarray, cost: CostModel) -> None:
        self.P, self.L = len(cost.pairs), cost.num_layers
        if kl.shape != (self.P, self.L + 1):
            raise SearchError(f"curves have shape {kl.shape}, expected ({self.P}, {self.L + 1})")
        if not np.all(np.isfinite(kl[:, self.L])):
            raise SearchError("every pair needs a finite divergence at depth L (dense)")
        self.kl = kl
        self.allowed = np.isfinite(kl)
        self.M = 1 << self.P
        self.full = self.M - 1
        self.scale = cost.dense if cost.dense > 0 else 1.0
        states = np.arange(self.M)
        # layer cost as a function of the *assigned* (pruned) set S: kept = full ^ S
        self.fcost = cost.layer_costs[:, self.full ^ states] / self.scale
        self.no_bit = [states[(states >> j) & 1 == 0] for j in range(self.P)]
        bits = ((states[:, None] >> np.arange(self.P)) & 1) == 0
        self.end_kl = (bits * kl[:, self.L][None, :]).sum(axis=1)  # unassigned pairs end dense

    def backward(self, a: float, b: float) -> list[list[np.ndarray]]:
        """``H[v][j][S]``: min of a*KL + b*cost (normalised) from stage (layer v, pair j)."""
        H = a * self.end_kl
        out: list[list[np.ndarray]] = [[None] * (self.P + 1) for _ in range(self.L)]  # type: ignore[list-item]
        for v in range(self.L - 1, -1, -1):
            H = H + b * self.fcost[v]
            out[v][self.P] = H
            for j in range(self.P - 1, -1, -1):
                if self.allowed[j, v]:
                    nb = self.no_bit[j]
                    H = H.copy()
                    H[nb] = np.minimum(H[nb], a * self.kl[j, v] + H[nb | (1 << j)])
                out[v][j] = H
        return out

    def trace(self, H: list[list[np.ndarray]], a: float) -> list[int]:
        """The argmin path of a backward DP, as one depth per pair."""
        depths = [self.L] * self.P
        S = 0
        for v in range(self.L):
            for j in range(self.P):
                bit = 1 << j
                if S & bit or not self.allowed[j, v]:
                    continue
                nxt = H[v][j + 1]
                if a * self.kl[j, v] + nxt[S | bit] < nxt[S]:
                    S |= bit
                    depths[j] = v
        return depths

def _pareto(c: np.ndarray, k: np.ndarray, r: np.ndarray):
    """Labels not dominated in (cost, KL): sorted by cost, strictly decreasing KL."""
    if len(c) <= 1:
        return c, k, r
    o = np.lexsort((k, c))
    c, k, r = c[o], k[o], r[o]
    prev_min = np.minimum.accumulate(k)
    keep = np.empty(len(k), bool)
    keep[0] = True
    keep[1:] = k[1:] < prev_min[:-1]
    return c[keep], k[keep], r[keep]

def solve_exact(
    curves: Mapping[Pair, Sequence[float]] | np.ndarray,
    cost: CostModel,
    budget_flops: float,
    *,
    dual_steps: int = 30,
) -> Solution:
    """The depth policy of least predicted KL with ``cost.cost(depths) <= budget_flops``, exactly.

    ``curves``: per pair (in ``cost.pairs`` order when an array), the KL at every depth 0..L
    (``inf`` = depth not allowed). Raises ``InfeasibleBudgetError`` with the cheapest reachable
    FLOPs when nothing fits.
    """
    t0 = time.perf_counter()
    kl = curves if isinstance(curves, np.ndarray) else curves_array(curves, cost.pairs)
    dag = _Dag(np.asarray(kl, dtype=float), cost)
    B = budget_flops / dag.scale
    B_tol = B * (1 + REL_TOL) + REL_TOL
    MC = dag.backward(0.0, 1.0)  # cheapest cost-to-go
    min_cost = float(MC[0][0][0]) * dag.scale
    if MC[0][0][0] > B_tol:
        raise InfeasibleBudgetError(
            f"budget {budget_flops / 1e12:.6g} TFLOPs ({budget_flops / cost.dense:.4f} of dense) is below "
            f"the cheapest policy this search space reaches: {min_cost / 1e12:.6g} TFLOPs "
            f"({min_cost / cost.dense:.4f} of dense)", min_cost)
    dual = _Dual(dag, cost, B, B_tol).solve(dual_steps)
    t_dual = time.perf_counter() - t0
    labels = _LabelSetting(dag, MC, dual, B, B_tol)
    depths = labels.run()
    flops = cost.cost(depths)
    predicted = float(sum(dag.kl[j, d] for j, d in enumerate(depths)))
    stats = {"seconds": time.perf_counter() - t0, "dual_seconds": t_dual, "lambda": dual.lam,
             "dual_bound": dual.bound, "labels_created": labels.n_rec, "max_labels_per_state": labels.max_labels,
             "gap_closed_by_dual": labels.gap_closed, "min_flops": min_cost}
    return Solution({p: int(d) for p, d in zip(cost.pairs, depths)}, predicted, flops, stats)


class _Dual:
    """The Lagrangian dual, by bisection on lambda: its best bound (and the backward DP there) bounds
    the labels; every primal argmin that fits the budget is an incumbent."""

    def __init__(self, dag: _Dag, cost: CostModel, B: float, B_tol: float) -> None:
        self.dag, self.cost, self.B, self.B_tol = dag, cost, B, B_tol
        self.bound, self.H, self.lam = -math.inf, None, 0.0
        self.best_kl, self.best_depths = math.inf, None

    def probe(self, lam: float) -> bool:
        """Solve the dual at ``lam``; keep the best dual and any fitting primal; True if it fits."""
        H = self.dag.backward(1.0, lam)
        depths = self.dag.trace(H, 1.0)
        c = self.cost.cost(depths) / self.dag.scale
        dual = float(H[0][0][0]) - lam * self.B
        if dual > self.bound:
            self.bound, self.H, self.lam = dual, H, lam
        if c > self.B_tol:
            return False
        k = float(sum(self.dag.kl[j, d] for j, d in enumerate(depths)))
        if k < self.best_kl:
            self.best_kl, self.best_depths = k, depths
        return True

    def solve(self, steps: int) -> _Dual:
        lo, hi = 0.0, 1.0
        for _ in range(200):  # find a lambda whose argmin fits
            if self.probe(hi):
                break
            lo, hi = hi, hi * 4
        for _ in range(steps):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 16
            if self.probe(mid):
                hi = mid
            else:
                lo = mid
            if lo > 0 and hi / lo < 1 + 1e-6:
                break
        return self


Labels = tuple[np.ndarray, np.ndarray, np.ndarray]  # (cost so far, KL so far, record id) per label


class _LabelSetting:
    """Label setting over the DAG, pruned by Pareto dominance, the feasibility bound (the cheapest
    completion must fit) and the Lagrangian bound (a label must be able to beat the incumbent)."""

    def __init__(self, dag: _Dag, MC: list[list[np.ndarray]], dual: _Dual, B: float, B_tol: float) -> None:
        self.dag, self.MC, self.dual, self.B, self.B_tol = dag, MC, dual, B, B_tol
        self.inc = dual.best_kl
        self.tol = 1e-12 * max(1.0, abs(self.inc)) if math.isfinite(self.inc) else 0.0
        self.rec_parent: list[np.ndarray] = []
        self.rec_pair: list[np.ndarray] = []
        self.rec_depth: list[np.ndarray] = []
        self.n_rec = 0
        self.labels: dict[int, Labels] = {0: (np.zeros(1), np.zeros(1), np.full(1, -1, dtype=np.int64))}
        self.max_labels = 1
        self.gap_closed = math.isfinite(self.inc) and dual.bound >= self.inc - self.tol  # the dual proves it optimal

    def bound_ok(self, S: int, c: np.ndarray, k: np.ndarray, v: int, j: int) -> np.ndarray:
        ok = c + self.MC[v][j][S] <= self.B_tol
        if math.isfinite(self.inc):  # only paths that can beat the incumbent are worth extending
            ok &= k + self.dual.H[v][j][S] - self.dual.lam * (self.B - c) < self.inc - self.tol
        return ok

    def run(self) -> list[int]:
        """The optimal depth vector (the incumbent when no label beats it)."""
        for v in range(0 if self.gap_closed else self.dag.L):
            for j in range(self.dag.P):
                if self.dag.allowed[j, v]:
                    self.assign(v, j)
            self.close_layer(v)
        return self.best_depths()

    def assign(self, v: int, j: int) -> None:
        """Extend every label without pair ``j`` by pruning ``j`` from layer ``v`` (depth ``j`` = ``v``)."""
        bit, kj = 1 << j, self.dag.kl[j, v]
        grown: dict[int, list[Labels]] = {}
        for S, (c, k, r) in self.labels.items():
            if S & bit:
                continue
            S2, k2 = S | bit, k + kj
            ok = self.bound_ok(S2, c, k2, v, j + 1)  # the stage after this decision is (v, j+1)
            if not ok.any():
                continue
            n = int(ok.sum())
            ids = np.arange(self.n_rec, self.n_rec + n)
            self.rec_parent.append(r[ok])
            self.rec_pair.append(np.full(n, j))
            self.rec_depth.append(np.full(n, v))
            self.n_rec += n
            grown.setdefault(S2, []).append((c[ok], k2[ok], ids))
        for S2, parts in grown.items():
            if S2 in self.labels:
                parts.append(self.labels[S2])
            self.labels[S2] = _pareto(*(np.concatenate([p[i] for p in parts]) for i in range(3)))

    def close_layer(self, v: int) -> None:
        """Layer ``v`` is done: add its cost, re-check the bounds at (v + 1, 0)."""
        nxt: dict[int, Labels] = {}
        for S, (c, k, r) in self.labels.items():
            c = c + self.dag.fcost[v][S]
            ok = self.bound_ok(S, c, k, v + 1, 0) if v + 1 < self.dag.L else c <= self.B_tol
            if ok.any():
                nxt[S] = (c[ok], k[ok], r[ok])
                self.max_labels = max(self.max_labels, int(ok.sum()))
        self.labels = nxt

    def best_depths(self) -> list[int]:
        best = (math.inf, math.inf, -1, 0)
        for S, (c, k, r) in (self.labels.items() if not self.gap_closed else ()):
            final = k + self.dag.end_kl[S]
            i = int(np.lexsort((c, final))[0])
            cand = (float(final[i]), float(c[i]), int(r[i]), S)
            if cand[:2] < best[:2]:
                best = cand
        if not math.isfinite(best[0]) or best[0] >= self.dual.best_kl:
            # nothing beat the incumbent (every label pruned against it): the incumbent is optimal
            if self.dual.best_depths is None:
                raise SearchError("exact solver found no feasible policy although the budget is reachable")
            return self.dual.best_depths
        parent = np.concatenate(self.rec_parent) if self.rec_parent else np.zeros(0, np.int64)
        pair_of = np.concatenate(self.rec_pair) if self.rec_pair else np.zeros(0, np.int64)
        depth_of = np.concatenate(self.rec_depth) if self.rec_depth else np.zeros(0, np.int64)
        depths = [self.dag.L] * self.dag.P
        r = best[2]
        while r >= 0:
            depths[int(pair_of[r])] = int(depth_of[r])
            r = int(parent[r])
        return depths


def solve_joint(
    solve: Callable[[Any, CostModel, float], Solution],
    curves: Any,
    nv_curve: Mapping[int, float],
    cost_at: Callable[[int], CostModel],
    budget_flops: float,
    *,
    full: int,
    reducer: str | None = None,
) -> Solution:
    """Depths and ``n_v`` jointly: ``solve`` the depths for every ``n_v`` of ``nv_curve`` (its KL per
    value; ``full`` = no reduction) with ``cost_at(n_v)``, keep the least total predicted KL. Ties go
    to the larger ``n_v``. Exact whenever ``solve`` is (the ``n_v`` axis is enumerated)."""
    best: tuple[float, Solution, int] | None = None
    cheapest = math.inf
    tried = {}
    for v in sorted(nv_curve, reverse=True):
        try:
            sol = solve(curves, cost_at(v), budget_flops)
        except InfeasibleBudgetError as e:
            cheapest = min(cheapest, e.min_flops)
            tried[v] = None
            continue
        total = sol.predicted_kl + float(nv_curve[v])
        tried[v] = total
        if best is None or total < best[0]:
            best = (total, sol, v)
    if best is None:
        raise InfeasibleBudgetError(
            f"no depth policy at any n_v in {sorted(nv_curve)} fits {budget_flops:.6g} FLOPs; the cheapest "
            f"reachable is {cheapest:.6g}", cheapest)
    total, sol, v = best
    stats = {**sol.stats, "depth_kl": sol.predicted_kl, "n_v_kl": float(nv_curve[v]),
             "n_v_candidates": {str(k): t for k, t in sorted(tried.items())}}
    return Solution(sol.depths, total, sol.flops, stats, n_v=None if v >= full else v,
                    reducer=None if v >= full else reducer)
