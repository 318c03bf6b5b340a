"""DOP search: additive divergence estimate + exact budgeted solver over depth policies.

A depth policy sets one depth per searched (type, group) pair. The sweep measured, for each pair
and grid depth, the divergence with only that pair changed; the *additive estimate* of a policy is
the sum of its pairs' single-change divergences (curves interpolated between grid depths).

FLOPs are not additive across pairs: attention couples every query group with every key group
(``n_q * n_kv`` per layer) and a pruned key/value side makes its group's q/mlp dead (free). But
they *are* additive across layers, and a layer's cost depends only on which pairs are still kept
there. So the exact solver walks the layers 0..L-1 as a DAG whose state is the set of pairs
already pruned ("assigned"); assigning pair j at layer v means depth j = v. A path is a policy;
its KL is the sum of per-pair terms and its FLOPs the sum of per-layer costs of the states it
visits. The budgeted minimum is a resource-constrained shortest path, solved exactly by label
setting with Pareto dominance and two admissible bounds (``solve_exact``):

- feasibility: the cheapest completion from a node (prune everything left now) must fit;
- Lagrangian: for any lambda >= 0, KL_rest >= H_lambda(node) - lambda * (budget - cost so far),
  with H_lambda the exact min of KL + lambda * FLOPs to the end (a scalar backward DP over the same
  DAG). lambda is chosen by bisection on the dual, whose primal solutions also give an incumbent.

Per-layer costs come from ``dop.flops.count_flops`` itself (``CostModel.from_flops`` probes it per
layer and per op, then checks the fitted model against ``count_flops`` on random policies).

The front end ``n_v`` (``dop.engine.front_end``) is searched jointly (``solve_joint``): its values are few,
so for each one the depths are solved exactly with the cost model of ``n_v`` visual tokens, under
the same budget (a fraction of the *unreduced* dense cost), and the policy with the least total
predicted KL (depth terms + the ``n_v`` term, additive like the rest) wins.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dop.budget import Budget, BudgetError, parse_budgets
from dop.io import atomic_write_json
from dop.ops import OP_TYPES, Operation, OpType, as_op_type
from dop.policy import DEFAULT_OUTPUT_GROUPS, DepthPolicy, Policy

log = logging.getLogger("dop.search")

Pair = tuple[str, str]  # (type, group), e.g. ("kv", "vision")
_REL_TOL = 1e-12  # FLOPs comparisons: the model and count_flops sum in different orders


class SearchError(ValueError):
    """The search cannot run: bad sweep data, unsupported cost model, or no feasible policy."""


class InfeasibleBudgetError(SearchError, BudgetError):
    """No depth policy fits the budget; ``min_flops`` is the cheapest one reachable."""

    def __init__(self, message: str, min_flops: float) -> None:
        super().__init__(message)
        self.min_flops = min_flops


def pair_key(pair: Pair) -> str:
    """``("kv", "vision") -> "kv_vision"`` (sweep store folder name)."""
    return f"{pair[0]}_{pair[1]}"


ATTN = "attn"  # a tied parameter: q and kv of a group share one depth (the paper's D_A)


def pair_type(type_: str) -> str:
    """An op type name, or ``attn`` for the tied q+kv parameter."""
    return ATTN if str(type_).lower() == ATTN else as_op_type(type_).value


def pair_ops(pair: Pair) -> tuple[Pair, ...]:
    """The (type, group) ops a searched parameter moves: ``attn`` moves q and kv together."""
    t, g = pair
    return (("q", g), ("kv", g)) if t == ATTN else ((t, g),)


def parse_pair(text: str) -> Pair:
    """``"kv_vision"``, ``"kv/vision"`` -> ``("kv", "vision")``; ``"attn_vision"`` is tied q+kv."""
    for sep in ("/", ":", "_"):
        if sep in text:
            t, g = text.split(sep, 1)
            return pair_type(t), g
    raise SearchError(f"pair {text!r} must be 'type_group', e.g. 'kv_vision'")


# --------------------------------------------------------------------------------------------
# Curves: single-change divergence per depth
# --------------------------------------------------------------------------------------------
def interpolate_curve(points: Mapping[int, float], num_layers: int) -> np.ndarray:
    """KL at every depth 0..L from measured grid depths, linear in between.

    Piecewise-linear interpolation is monotone between neighbouring grid points (it never
    overshoots them), so a monotone measured curve stays monotone. Depth L (dense) is 0 when not
    measured. Depths below the shallowest measured one are unreachable (``inf``): the solver never
    picks them rather than extrapolate.
    """
    pts = {int(d): float(k) for d, k in points.items()}
    pts.setdefault(num_layers, 0.0)
    bad = [d for d in pts if not 0 <= d <= num_layers]
    if bad:
        raise SearchError(f"curve depth {bad[0]} outside 0..{num_layers}")
    xs = np.array(sorted(pts), dtype=float)
    ys = np.array([pts[int(x)] for x in xs])
    if not np.all(np.isfinite(ys)):
        raise SearchError(f"curve has non-finite divergences: {pts}")
    depths = np.arange(num_layers + 1, dtype=float)
    curve = np.interp(depths, xs, ys)
    curve[depths < xs[0]] = np.inf
    return curve


def curves_array(curves: Mapping[Pair, Sequence[float]], pairs: Sequence[Pair]) -> np.ndarray:
    missing = [p for p in pairs if p not in curves]
    if missing:
        raise SearchError(f"no divergence curve for pair {pair_key(missing[0])}; sweep it first")
    return np.array([np.asarray(curves[p], dtype=float) for p in pairs])


def predict_kl(curves: Mapping[Pair, Sequence[float]], depths: Mapping[Pair, int]) -> float:
    """The additive estimate: sum over pairs of the single-change KL at the pair's depth."""
    total = 0.0
    for pair, depth in depths.items():
        if pair not in curves:
            raise SearchError(f"no divergence curve for pair {pair_key(pair)}")
        total += float(curves[pair][depth])
    return total


# --------------------------------------------------------------------------------------------
# Cost model: exact per-layer FLOPs as a function of the kept pairs
# --------------------------------------------------------------------------------------------
@dataclass
class CostModel:
    """FLOPs of a depth policy, exact and fast: ``layer_costs[v, U]`` is layer v's cost when the
    searched pairs in bitmask ``U`` (bit j = ``pairs[j]``) are kept there (dead ops applied)."""

    num_layers: int
    pairs: list[Pair]
    layer_costs: np.ndarray  # (L, 2^P)
    dense: float
    output_groups: tuple[str, ...] = DEFAULT_OUTPUT_GROUPS

    def masks(self, depths: Sequence[int]) -> np.ndarray:
        """Kept bitmask per layer for a depth vector (one depth per pair)."""
        d = np.asarray(depths)
        layers = np.arange(self.num_layers)[:, None]
        bits = (layers < d[None, :]).astype(np.int64)
        return (bits << np.arange(len(self.pairs))).sum(axis=1)

    def cost(self, depths: Sequence[int] | Mapping[Pair, int]) -> float:
        if isinstance(depths, Mapping):
            depths = [depths.get(p, self.num_layers) for p in self.pairs]
        m = self.masks(depths)
        return float(self.layer_costs[np.arange(self.num_layers), m].sum())

    @classmethod
    def from_counter(
        cls,
        count: Callable[[Policy], float],
        num_layers: int,
        groups: Sequence[str],
        pairs: Sequence[Pair],
        *,
        output_groups: Iterable[str] = DEFAULT_OUTPUT_GROUPS,
        verify: int = 8,
        seed: int = 0,
    ) -> CostModel:
        """Fit per-layer costs by probing ``count`` (a FLOPs counter of a ``Policy``).

        Per layer, a prefill's cost is linear in which (type, group) ops run plus one bilinear
        term per (query group, key group) (the n_q x n_kv score matrix). Probing one op and one
        (q, kv) pair at a time recovers the coefficients exactly; ``verify`` random depth policies
        are then compared with ``count`` and any mismatch is an error, not a silent approximation.
        """
        pairs = [(pair_type(t), g) for t, g in pairs]
        moved = [op for p in pairs for op in pair_ops(p)]
        if len(set(moved)) != len(moved):
            raise SearchError(f"searched parameters overlap (an op is moved twice): {[pair_key(p) for p in pairs]}")
        groups = list(groups)
        unknown = sorted({g for _, g in pairs} - set(groups))
        if unknown:
            raise SearchError(f"searched group {unknown[0]!r} is not a token group of this model; "
                              f"valid groups: {groups}")
        output_groups = tuple(output_groups)
        L, P = num_layers, len(pairs)
        if P > 16:
            raise SearchError(f"{P} searched pairs: the exact solver's state space (2^P) is too large; "
                              "tie types (attn) or search fewer groups")
        dense = float(count(Policy()))
        ops = [(t.value, g) for g in groups for t in OP_TYPES]
        alpha = np.zeros((L, len(ops)))  # saving of pruning one op (negative cost delta)
        beta = np.zeros((L, len(groups), len(groups)))  # interaction of pruned q_g with pruned kv_g'
        oi = {op: i for i, op in enumerate(ops)}
        for v in range(L):
            single = {}
            for (t, g) in ops:
                single[(t, g)] = float(count(Policy([Operation(v, g, t)]))) - dense
                alpha[v, oi[(t, g)]] = single[(t, g)]
            for a, ga in enumerate(groups):
                for b, gb in enumerate(groups):
                    both = float(count(Policy([Operation(v, ga, OpType.Q), Operation(v, gb, OpType.KV)])))
                    beta[v, a, b] = both - dense - single[("q", ga)] - single[("kv", gb)]
        # Effective pruned indicators of every op for every kept-mask U of the searched pairs.
        M = 1 << P
        U = np.arange(M)
        pruned = {}
        for op in ops:
            pruned[op] = np.zeros(M, bool)
        for j, pair in enumerate(pairs):
            for op in pair_ops(pair):
                pruned[op] = ((U >> j) & 1) == 0
        for g in groups:
            if g in output_groups:
                continue
            kv_dead = pruned[("kv", g)]
            for t in ("q", "mlp"):  # dead ops: nobody reads this group's outputs any more
                pruned[(t, g)] = pruned[(t, g)] | kv_dead
        layer_costs = np.full((L, M), dense / L)
        for v in range(L):
            for op in ops:
                layer_costs[v] += alpha[v, oi[op]] * pruned[op]
            for a, ga in enumerate(groups):
                for b, gb in enumerate(groups):
                    if beta[v, a, b]:
                        layer_costs[v] += beta[v, a, b] * (pruned[("q", ga)] & pruned[("kv", gb)])
        model = cls(L, pairs, layer_costs, dense, output_groups)
        rng = np.random.default_rng(seed)
        for trial in range(verify):
            depths = rng.integers(0, L + 1, size=P) if trial else np.zeros(P, int)
            depth_policy = DepthPolicy({p: int(d) for p, d in zip(pairs, depths)})
            want = float(count(depth_policy.expand(L, output_groups=output_groups)))
            got = model.cost(depths)
            if abs(got - want) > 1e-9 * max(abs(want), 1.0):
                raise SearchError(
                    f"the FLOPs counter is not linear + (q x kv) bilinear per layer: policy {depth_policy} "
                    f"counts {want:.6g}, the fitted model {got:.6g}; the exact solver needs that structure"
                )
        return model

    @classmethod
    def from_flops(
        cls,
        text_config: Any,
        groups: Mapping[str, float],
        pairs: Sequence[Pair],
        *,
        convention: str = "dop",
        output_groups: Iterable[str] = DEFAULT_OUTPUT_GROUPS,
        verify: int = 8,
    ) -> CostModel:
        from dop.flops import count_flops, text_shape

        num_layers = text_shape(text_config).num_layers

        def count(policy: Policy) -> float:
            return count_flops(text_config, groups, policy, convention=convention)

        return cls.from_counter(count, num_layers, list(groups), pairs, output_groups=output_groups,
                                verify=verify)


# --------------------------------------------------------------------------------------------
# Exact solver
# --------------------------------------------------------------------------------------------
@dataclass
class Solution:
    depths: dict[Pair, int]
    predicted_kl: float
    flops: float
    stats: dict[str, Any] = field(default_factory=dict)
    n_v: int | None = None  # the front end's kept visual tokens per image (None: all)
    reducer: str | None = None

    def depth_policy(self, num_layers: int | None = None, model: str | None = None) -> DepthPolicy:
        return DepthPolicy(dict(self.depths), num_layers=num_layers, model=model, n_v=self.n_v,
                           reducer=self.reducer)


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
    P, L = dag.P, dag.L
    B = budget_flops / dag.scale
    B_tol = B * (1 + _REL_TOL) + _REL_TOL
    MC = dag.backward(0.0, 1.0)  # cheapest cost-to-go
    min_cost = float(MC[0][0][0]) * dag.scale
    if MC[0][0][0] > B_tol:
        raise InfeasibleBudgetError(
            f"budget {budget_flops / 1e12:.6g} TFLOPs ({budget_flops / cost.dense:.4f} of dense) is below "
            f"the cheapest policy this search space reaches: {min_cost / 1e12:.6g} TFLOPs "
            f"({min_cost / cost.dense:.4f} of dense)", min_cost)

    # Lagrangian dual: bisection on lambda; every primal solution that fits is an incumbent.
    best_kl, best_depths = math.inf, None

    def lagrange(lam: float):
        H = dag.backward(1.0, lam)
        depths = dag.trace(H, 1.0)
        c = cost.cost(depths) / dag.scale
        return H, depths, c, float(H[0][0][0]) - lam * B

    best_dual, best_H, best_lam = -math.inf, None, 0.0

    def probe(lam: float) -> bool:
        """Solve the dual at ``lam``; keep the best dual and any fitting primal; True if it fits."""
        nonlocal best_dual, best_H, best_lam, best_kl, best_depths
        H, depths, c, dual = lagrange(lam)
        if dual > best_dual:
            best_dual, best_H, best_lam = dual, H, lam
        if c > B_tol:
            return False
        k = float(sum(dag.kl[j, d] for j, d in enumerate(depths)))
        if k < best_kl:
            best_kl, best_depths = k, depths
        return True

    lo, hi = 0.0, 1.0
    for _ in range(200):  # find a lambda whose argmin fits
        if probe(hi):
            break
        lo, hi = hi, hi * 4
    for _ in range(dual_steps):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 16
        if probe(mid):
            hi = mid
        else:
            lo = mid
        if lo > 0 and hi / lo < 1 + 1e-6:
            break
    HL, lam = best_H, best_lam
    t_dual = time.perf_counter() - t0

    # Label setting over the DAG, pruned by dominance and the two bounds.
    inc = best_kl
    tol = 1e-12 * max(1.0, abs(inc)) if math.isfinite(inc) else 0.0
    rec_parent: list[np.ndarray] = []
    rec_pair: list[np.ndarray] = []
    rec_depth: list[np.ndarray] = []
    n_rec = 0
    labels: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
        0: (np.zeros(1), np.zeros(1), np.full(1, -1, dtype=np.int64))
    }
    max_labels = 1

    def bound_ok(S: int, c: np.ndarray, k: np.ndarray, v: int, j: int) -> np.ndarray:
        ok = c + MC[v][j][S] <= B_tol
        if math.isfinite(inc):  # only paths that can beat the incumbent are worth extending
            ok &= k + HL[v][j][S] - lam * (B - c) < inc - tol
        return ok

    gap_closed = math.isfinite(inc) and best_dual >= inc - tol  # the dual proves the incumbent optimal
    for v in range(0 if gap_closed else L):
        for j in range(P):
            if not dag.allowed[j, v]:
                continue
            bit = 1 << j
            kj = dag.kl[j, v]
            grown: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
            for S, (c, k, r) in labels.items():
                if S & bit:
                    continue
                S2 = S | bit
                k2 = k + kj
                # the stage after this decision is (v, j+1): bound with its arrays
                nj = j + 1
                ok = bound_ok(S2, c, k2, v, nj)
                if not ok.any():
                    continue
                n = int(ok.sum())
                ids = np.arange(n_rec, n_rec + n)
                rec_parent.append(r[ok])
                rec_pair.append(np.full(n, j))
                rec_depth.append(np.full(n, v))
                n_rec += n
                grown.setdefault(S2, []).append((c[ok], k2[ok], ids))
            for S2, parts in grown.items():
                if S2 in labels:
                    parts.append(labels[S2])
                c = np.concatenate([p[0] for p in parts])
                k = np.concatenate([p[1] for p in parts])
                r = np.concatenate([p[2] for p in parts])
                labels[S2] = _pareto(c, k, r)
        # layer v is done: add its cost, re-check bounds at (v+1, 0)
        nxt: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for S, (c, k, r) in labels.items():
            c = c + dag.fcost[v][S]
            if v + 1 < L:
                ok = bound_ok(S, c, k, v + 1, 0)
            else:
                ok = c <= B_tol
            if ok.any():
                nxt[S] = (c[ok], k[ok], r[ok])
                max_labels = max(max_labels, int(ok.sum()))
        labels = nxt

    best = (math.inf, math.inf, -1, 0)
    for S, (c, k, r) in (labels.items() if not gap_closed else ()):
        final = k + dag.end_kl[S]
        i = int(np.lexsort((c, final))[0])
        cand = (float(final[i]), float(c[i]), int(r[i]), S)
        if cand[:2] < best[:2]:
            best = cand
    if not math.isfinite(best[0]) or best[0] >= best_kl:
        # nothing beat the incumbent (every label pruned against it): the incumbent is optimal
        if best_depths is None:
            raise SearchError("exact solver found no feasible policy although the budget is reachable")
        depths = best_depths
    else:
        parent = np.concatenate(rec_parent) if rec_parent else np.zeros(0, np.int64)
        pair_of = np.concatenate(rec_pair) if rec_pair else np.zeros(0, np.int64)
        depth_of = np.concatenate(rec_depth) if rec_depth else np.zeros(0, np.int64)
        depths = [L] * P
        r = best[2]
        while r >= 0:
            depths[int(pair_of[r])] = int(depth_of[r])
            r = int(parent[r])
    flops = cost.cost(depths)
    predicted = float(sum(dag.kl[j, d] for j, d in enumerate(depths)))
    stats = {"seconds": time.perf_counter() - t0, "dual_seconds": t_dual, "lambda": lam,
             "dual_bound": best_dual, "labels_created": n_rec, "max_labels_per_state": max_labels,
             "gap_closed_by_dual": gap_closed, "min_flops": min_cost}
    return Solution({p: int(d) for p, d in zip(cost.pairs, depths)}, predicted, flops, stats)


# --------------------------------------------------------------------------------------------
# Baseline solver and the approximation check
# --------------------------------------------------------------------------------------------
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


def greedy_search(
    curves: Mapping[Pair, Sequence[float]] | np.ndarray,
    cost: CostModel,
    budget_flops: float,
) -> Solution:
    """GSOP-style greedy: from dense, repeatedly deepen-prune (depth - 1) the pair with the least
    KL increase per FLOP saved until the budget fits. Not optimal; a baseline for the exact one."""
    kl = curves if isinstance(curves, np.ndarray) else curves_array(curves, cost.pairs)
    L, P = cost.num_layers, len(cost.pairs)
    depths = [L] * P
    current = cost.cost(depths)
    limit = budget_flops * (1 + _REL_TOL)
    steps = 0
    while current > limit:
        best = None
        for j in range(P):
            d = depths[j] - 1
            while d >= 0 and not np.isfinite(kl[j, d]):
                d -= 1
            if d < 0:
                continue
            trial = depths.copy()
            trial[j] = d
            saved = current - cost.cost(trial)
            if saved <= 0:
                continue
            score = (kl[j, d] - kl[j, depths[j]]) / saved
            if best is None or score < best[0]:
                best = (score, j, d, saved)
        if best is None:
            raise InfeasibleBudgetError(
                f"greedy search cannot go below {current / 1e12:.6g} TFLOPs "
                f"(budget {budget_flops / 1e12:.6g})", current)
        _, j, d, saved = best
        depths[j] = d
        current -= saved
        steps += 1
    current = cost.cost(depths)
    predicted = float(sum(kl[j, d] for j, d in enumerate(depths)))
    return Solution({p: int(d) for p, d in zip(cost.pairs, depths)}, predicted, current, {"steps": steps})


# --------------------------------------------------------------------------------------------
# GSOP-style objective: greedy on the calibration-set task accuracy
# --------------------------------------------------------------------------------------------
OBJECTIVES = ("kl", "accuracy")
AccuracyFn = Callable[[Mapping[str, Policy]], Mapping[str, float]]  # {name: policy} -> {name: accuracy}


def accuracy_greedy_search(
    accuracy: AccuracyFn,
    cost: CostModel,
    budget_flops: float,
    *,
    grid: Sequence[int] | None = None,
    curves: Mapping[Pair, Sequence[float]] | np.ndarray | None = None,
) -> Solution:
    """GSOP-style greedy on measured task accuracy (``method.objective=accuracy``).

    From dense, each step scores every candidate *policy* (the current one with a single parameter
    moved one grid step shallower) with ``accuracy`` in one call, and takes the candidate with the
    least accuracy loss per FLOP saved; ties: the least accuracy loss, then the least single-change
    KL increase when ``curves`` are given, then the first parameter. Repeats until the budget fits.
    A grid step that saves no FLOPs (a q/mlp already dead because its group's kv is pruned there) is
    stepped over to the next grid depth that does: those policies compute the same thing.
    ``predicted_kl`` is the additive KL estimate when ``curves`` are given, else None.
    """
    t0 = time.perf_counter()
    L, P = cost.num_layers, len(cost.pairs)
    grid = sorted({int(d) for d in (grid if grid is not None else range(L + 1))} | {L})
    if grid[0] < 0:
        raise SearchError(f"grid depth {grid[0]} outside 0..{L}")
    kl = None
    if curves is not None:
        kl = curves if isinstance(curves, np.ndarray) else curves_array(curves, cost.pairs)
    limit = budget_flops * (1 + _REL_TOL)
    min_cost = cost.cost([grid[0]] * P)  # pruning more never costs more: all-shallowest is cheapest
    if min_cost > limit:
        raise InfeasibleBudgetError(
            f"budget {budget_flops / 1e12:.6g} TFLOPs is below the cheapest policy this search space reaches "
            f"({min_cost / 1e12:.6g} TFLOPs, {min_cost / cost.dense:.4f} of dense)", min_cost)

    def policy_of(depths: Sequence[int]) -> Policy:
        return DepthPolicy({p: int(d) for p, d in zip(cost.pairs, depths)}).expand(
            L, output_groups=cost.output_groups)

    depths = [L] * P
    current = cost.cost(depths)
    acc = float(accuracy({"dense": policy_of(depths)})["dense"])
    dense_acc, evaluations, trace = acc, 1, []
    while current > limit:
        cands: dict[str, tuple[int, int, float]] = {}
        for j in range(P):
            for d in (g for g in reversed(grid) if g < depths[j]):
                if kl is not None and not np.isfinite(kl[j, d]):
                    continue
                trial = depths.copy()
                trial[j] = d
                saved = current - cost.cost(trial)
                if saved > _REL_TOL * cost.dense:
                    cands[pair_key(cost.pairs[j])] = (j, d, saved)
                    break
        if not cands:
            raise InfeasibleBudgetError(
                f"accuracy greedy search cannot go below {current / 1e12:.6g} TFLOPs "
                f"(budget {budget_flops / 1e12:.6g})", current)
        policies = {}
        for name, (j, d, _) in cands.items():
            trial = depths.copy()
            trial[j] = d
            policies[name] = policy_of(trial)
        scores = accuracy(policies)
        evaluations += len(policies)
        missing = sorted(set(cands) - set(scores))
        if missing:
            raise SearchError(f"the accuracy scorer returned no value for candidate {missing[0]}")

        ranked = []  # (loss per FLOP saved, loss, KL increase if known, parameter index, name)
        for name, (j, d, saved) in cands.items():
            loss = acc - float(scores[name])
            dkl = float(kl[j, d] - kl[j, depths[j]]) if kl is not None else 0.0
            ranked.append((loss / saved, loss, dkl, j, name))
        best = min(ranked)[-1]
        j, d, saved = cands[best]
        depths[j] = d
        acc = float(scores[best])
        current = cost.cost(depths)
        trace.append({"parameter": best, "depth": d, "accuracy": acc, "flops": current})
    predicted = float(sum(kl[j, d] for j, d in enumerate(depths))) if kl is not None else None
    stats = {"seconds": time.perf_counter() - t0, "steps": len(trace), "evaluations": evaluations,
             "accuracy": acc, "dense_accuracy": dense_acc, "trace": trace}
    return Solution({p: int(d) for p, d in zip(cost.pairs, depths)}, predicted, current, stats)


def calibration_answers(samples: Sequence[Mapping[str, Any]]) -> list[str]:
    """The reference answer of every calibration sample; an error naming those without one."""
    missing = [str(s.get("id", i)) for i, s in enumerate(samples)
               if s.get("answer") is None or str(s.get("answer")).strip() == ""]
    if missing:
        raise SearchError(
            f"objective=accuracy needs a reference answer for every calibration sample; {len(missing)} of "
            f"{len(samples)} have no 'answer' (e.g. {missing[:3]}); use data whose calibration split has "
            "answers, or method.objective=kl")
    return [str(s["answer"]) for s in samples]


def calibration_accuracy(
    model: Any,
    processor: Any,
    samples: Sequence[Mapping[str, Any]],
    policies: Mapping[str, Policy],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 5,
    until: Sequence[str] = ("\n",),
) -> dict[str, float]:
    """Exact-match accuracy of each policy's greedy answers on the calibration samples, with the
    prompts and decoding of ``dop.evaluation.scoring.score_synthetic`` (policies via the engine)."""
    from dop.evaluation.scoring import build_prompt, exact_match, generate_texts

    answers = calibration_answers(samples)
    prompts = [build_prompt(processor, str(s["question"])) for s in samples]
    images = [[s["image"]] for s in samples]
    out = {}
    for name, policy in policies.items():
        correct = 0.0
        for start in range(0, len(samples), batch_size):
            stop = start + batch_size
            texts = generate_texts(model, processor, images[start:stop], prompts[start:stop],
                                   max_new_tokens=max_new_tokens, until=until, policy=policy)
            correct += sum(exact_match(t, a) for t, a in zip(texts, answers[start:stop]))
        out[name] = correct / len(samples)
    return out


def _accuracy_scorer(job: Any, cfg: Any) -> AccuracyFn:
    """``calibration_accuracy`` bound to the job's model, processor and calibration samples."""
    samples = getattr(job, "calibration_samples", None)
    processor = getattr(job, "processor", None)
    if samples is None or processor is None:
        raise SearchError("objective=accuracy needs the job's calibration samples and processor "
                          "(SweepJob.from_config sets job.calibration_samples and job.processor)")
    calibration_answers(samples)  # fail before any model work
    method = cfg.method
    data = cfg.get("data", {}) or {}
    synthetic = str(data.get("kind") or data.get("name")) == "synthetic"
    max_new = int(method.get("accuracy_max_new_tokens") or (5 if synthetic else 16))
    batch_size = int((cfg.get("sweep", {}) or {}).get("batch_size", 8))
    device = str(cfg.get("device", "auto"))
    model = job.model
    if device.startswith("cuda") or (device == "auto" and torch_cuda_available()):
        model.to(device if device.startswith("cuda") else "cuda")
    model.eval()

    cache: dict[tuple, float] = {}  # budgets share the greedy path: a tighter one replays it for free

    def key(policy: Policy) -> tuple:
        return tuple(sorted((int(op.layer), str(op.group), str(op.type)) for op in policy))

    def score(policies: Mapping[str, Policy]) -> dict[str, float]:
        todo = {name: p for name, p in policies.items() if key(p) not in cache}
        if todo:
            for name, acc in calibration_accuracy(model, processor, samples, todo, batch_size=batch_size,
                                                  max_new_tokens=max_new).items():
                cache[key(todo[name])] = acc
        return {name: cache[key(p)] for name, p in policies.items()}

    return score


def torch_cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    # average ranks over ties
    for value in np.unique(x):
        idx = np.where(x == value)[0]
        if len(idx) > 1:
            ranks[idx] = ranks[idx].mean()
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def check_additive(points: Iterable[tuple[float, float]]) -> dict[str, float]:
    """Agreement of the additive estimate with measured joint divergences.

    ``points``: (predicted KL, measured KL) per random depth policy. Returns Pearson and Spearman
    correlations, the mean ratio measured / predicted and the count.
    """
    pts = np.array(list(points), dtype=float).reshape(-1, 2)
    if len(pts) == 0:
        raise SearchError("check_additive needs at least one (predicted, measured) point")
    pred, meas = pts[:, 0], pts[:, 1]
    ratio = float(np.mean(meas / np.where(pred == 0, np.nan, pred))) if np.any(pred) else float("nan")
    return {"n": int(len(pts)), "pearson": _pearson(pred, meas),
            "spearman": _pearson(_ranks(pred), _ranks(meas)), "mean_ratio": ratio}


def random_depth_policies(
    pairs: Sequence[Pair], num_layers: int, n: int, seed: int = 0, grid: Sequence[int] | None = None
) -> list[dict[Pair, int]]:
    """``n`` random depth assignments (uniform over the grid) for ``check_additive``."""
    rng = np.random.default_rng(seed)
    values = list(grid) if grid is not None else list(range(num_layers + 1))
    return [{p: int(rng.choice(values)) for p in pairs} for _ in range(n)]


def brute_force(
    curves: Mapping[Pair, Sequence[float]] | np.ndarray,
    cost: CostModel,
    budget_flops: float,
    count: Callable[[Sequence[int]], float] | None = None,
) -> Solution:
    """Enumerate every depth vector (tiny instances only; the tests' reference)."""
    kl = curves if isinstance(curves, np.ndarray) else curves_array(curves, cost.pairs)
    L, P = cost.num_layers, len(cost.pairs)
    count = count or cost.cost
    limit = budget_flops * (1 + _REL_TOL) + _REL_TOL * cost.dense
    best: tuple[float, float, tuple[int, ...]] | None = None
    for depths in itertools.product(range(L + 1), repeat=P):
        k = float(sum(kl[j, d] for j, d in enumerate(depths)))
        if not math.isfinite(k) or (best is not None and k > best[0]):
            continue
        c = count(depths)
        if c <= limit and (best is None or (k, c) < best[:2]):
            best = (k, c, depths)
    if best is None:
        raise InfeasibleBudgetError("brute force: nothing fits", math.nan)
    return Solution({p: int(d) for p, d in zip(cost.pairs, best[2])}, best[0], best[1])


# --------------------------------------------------------------------------------------------
# Stage entry point
# --------------------------------------------------------------------------------------------
def resolve_budget(
    budget: Budget, cost: CostModel, flops_for_tokens: Callable[[float], float] | None = None
) -> float:
    return budget.to_flops(cost.dense, flops_for_tokens)


def run(cfg: Any) -> dict[str, Any]:
    """``dop stage=search``: sweep if missing, then one exact solve per budget."""
    from dop.sweep import SweepJob

    job = SweepJob.from_config(cfg)
    if _objective(cfg.method) != "accuracy":  # GSOP's objective needs no sweep (its KL breaks ties if present)
        job.run(complete=True)
    return search_job(job, cfg)


def _objective(method: Any) -> str:
    objective = str(method.get("objective", "kl"))
    if objective not in OBJECTIVES:
        raise SearchError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    return objective


def search_job(job: Any, cfg: Any) -> dict[str, Any]:
    """Solve every configured budget on a finished sweep; write policies and ``search.json``."""
    from dop.flops import count_flops, equivalent_tokens, flops_for_tokens

    method = cfg.method
    objective = _objective(method)
    L = job.num_layers
    fp = job.reference.fingerprint
    if objective == "accuracy":
        try:  # KL only breaks accuracy ties and gives predicted_kl: used when a sweep is present
            curves = job.store.curves(job.pairs, L, fp)
        except (SearchError, ValueError):
            curves = None
    else:
        curves = job.store.curves(job.pairs, L, fp)
    groups = job.flops_groups()
    convention = str(method.get("convention", "dop"))
    cost = CostModel.from_flops(job.text_config, groups, job.pairs, convention=convention)
    nv = job.nv_curve() if getattr(job, "nv_grid", None) else {}  # the front end's KL per n_v
    if nv and objective == "accuracy":
        raise SearchError("method.n_v is searched on the KL objective (its curve comes from the sweep); "
                          "set method.n_v=null with objective=accuracy")
    nv_costs: dict[int, CostModel] = {}

    def cost_at(n_v: int) -> CostModel:
        from dop.flops import front_end_groups

        if n_v not in nv_costs:
            reduced = front_end_groups(groups, Policy(n_v=n_v))
            nv_costs[n_v] = cost if reduced == groups else CostModel.from_flops(
                job.text_config, reduced, job.pairs, convention=convention)
        return nv_costs[n_v]

    def tokens_to_flops(k: float) -> float:
        return flops_for_tokens(job.text_config, groups, k, convention=convention)

    if str(method.get("interpolation", "linear")) != "linear":
        raise SearchError(f"interpolation {method.get('interpolation')!r} is not supported; valid: linear")
    if objective == "accuracy":  # GSOP: greedy on calibration accuracy (method.solver is ignored)
        from dop.sweep import grid_depths

        solver = "greedy"
        scorer = _accuracy_scorer(job, cfg)
        grid = grid_depths(L, int(getattr(job, "grid_step", 1)))

        def solve(curves: Any, cost: CostModel, target: float) -> Solution:
            return accuracy_greedy_search(scorer, cost, target, grid=grid, curves=curves)
    else:
        solver = str(method.get("solver", "exact"))
        solve = {"exact": solve_exact, "greedy": greedy_search}.get(solver)
        if solve is None:
            raise SearchError(f"unknown solver {solver!r}; valid: exact, greedy")
    budgets = parse_budgets(cfg.budget)
    run_dir = Path(job.run_dir)
    results: dict[str, Any] = {"model": job.model_id, "num_layers": L, "groups": groups,
                               "pairs": [pair_key(p) for p in job.pairs], "convention": convention,
                               "dense_flops": cost.dense, "fingerprint": fp, "solver": solver,
                               "objective": objective, "budgets": {}}
    if nv:
        results["n_v"] = {"reducer": job.reducer, "curve": {str(v): k for v, k in sorted(nv.items())}}
    policies: dict[str, Policy] = {}
    for budget in budgets:
        target = resolve_budget(budget, cost, tokens_to_flops)  # a fraction of the unreduced dense cost
        if nv:
            sol = solve_joint(solve, curves, nv, cost_at, target, full=job.nv_full, reducer=job.reducer)
        else:
            sol = solve(curves, cost, target)
        depth_policy = sol.depth_policy(L, job.model_id)
        policy = depth_policy.expand(L)
        exact = count_flops(job.text_config, groups, policy, convention=convention)
        policies[budget.name] = policy
        results["budgets"][budget.name] = {
            "budget": {"kind": budget.kind, "value": budget.value, "flops": target},
            "depths": depth_policy.to_dict()["depths"],  # attn parameters appear as q and kv
            "parameters": {pair_key(p): d for p, d in sorted(sol.depths.items())},
            "n_v": sol.n_v, "reducer": sol.reducer,
            "predicted_kl": sol.predicted_kl, "measured_kl": None,
            "flops": exact, "tflops": exact / 1e12, "ratio": exact / cost.dense,
            "equivalent_tokens": _equivalent_tokens(equivalent_tokens, job.text_config, groups, exact, convention),
            "solver_seconds": sol.stats.get("seconds"),
        }
        if nv:
            results["budgets"][budget.name].update(
                depth_kl=sol.stats["depth_kl"], n_v_kl=sol.stats["n_v_kl"],
                n_v_candidates=sol.stats["n_v_candidates"])
        if objective == "accuracy":
            results["budgets"][budget.name].update(
                calibration_accuracy=sol.stats["accuracy"], dense_calibration_accuracy=sol.stats["dense_accuracy"],
                accuracy_evaluations=sol.stats["evaluations"], greedy_trace=sol.stats["trace"])
    # one Lightning predict scores every found policy and the additive-check policies
    checks = random_depth_policies(job.pairs, L, int(method.get("check_additive", 0) or 0),
                                   seed=int(cfg.get("seed", 0))) if curves is not None else []
    # with a front end, each check policy also draws an n_v (None: the full count)
    rng = np.random.default_rng(int(cfg.get("seed", 0)) + 1)
    check_nv = [int(rng.choice(sorted(nv))) if nv else None for _ in checks]
    check_nv = [None if v is None or v >= job.nv_full else v for v in check_nv]
    to_measure = dict(policies) if method.get("measure", True) else {}
    to_measure.update({f"check_{i}": DepthPolicy(d, n_v=v, reducer=job.reducer if v is not None else None).expand(L)
                       for i, (d, v) in enumerate(zip(checks, check_nv))})
    measured = job.measure_many(to_measure) if to_measure else {}
    for name, policy in policies.items():
        entry = results["budgets"][name]
        entry["measured_kl"] = measured.get(name)
        policy.meta = {**policy.meta, "budget": entry["budget"], "predicted_kl": entry["predicted_kl"],
                       "measured_kl": entry["measured_kl"], "flops": entry["flops"], "ratio": entry["ratio"],
                       "fingerprint": fp, "objective": objective, "solver": solver}
        if nv:
            policy.meta.update(depth_kl=entry["depth_kl"], n_v_kl=entry["n_v_kl"])
        if objective == "accuracy":
            policy.meta["calibration_accuracy"] = entry["calibration_accuracy"]
        path = run_dir / "policies" / f"{name}.yaml"
        policy.to_yaml(path)
        entry["policy"] = str(path)
        log.info("budget %s: predicted KL %s, measured %s, %.3f of dense, depths %s%s", name,
                 entry["predicted_kl"], entry["measured_kl"], entry["ratio"], entry["depths"],
                 f", n_v {entry['n_v']} ({entry['reducer']})" if entry["n_v"] is not None else "")
    if checks and curves is not None:
        pts = [(predict_kl(curves, d) + (nv[v] if v is not None else 0.0), measured[f"check_{i}"])
               for i, (d, v) in enumerate(zip(checks, check_nv))]
        results["additive_check"] = {**check_additive(pts), "points": pts}
    atomic_write_json(run_dir / "search.json", results, indent=2, default=float)
    _log_tracking(cfg, run_dir, results, policies)
    return results


def _equivalent_tokens(fn: Callable[..., float], text_config: Any, groups: Mapping[str, float], flops: float,
                       convention: str) -> float | None:
    """Equivalent visual tokens, or None when the policy also prunes non-visual groups below
    their dense cost (no visual token count matches it)."""
    from dop.flops import FlopsError

    try:
        return float(fn(text_config, groups, flops, convention=convention))
    except FlopsError:
        return None


def _log_tracking(cfg: Any, run_dir: Any, results: Mapping[str, Any],
                  policies: Mapping[str, Policy] | None = None) -> None:
    """Mirror the search to W&B (optional: the run dir is the source of truth)."""
    try:
        from dop.tracking import log_metrics, log_policy_heatmap, log_table, start_run
    except ImportError:
        return
    try:
        with start_run(cfg, "search", run_dir) as run:
            rows = []
            for name, entry in results["budgets"].items():
                log_metrics(run, {f"search/{name}/predicted_kl": entry["predicted_kl"],
                                  f"search/{name}/measured_kl": entry["measured_kl"],
                                  f"search/{name}/ratio": entry["ratio"],
                                  f"search/{name}/tflops": entry["tflops"],
                                  **({f"search/{name}/n_v": entry["n_v"]} if entry.get("n_v") is not None else {})})
                rows.append([name, entry["predicted_kl"], entry["measured_kl"], entry["ratio"],
                             entry["tflops"], json.dumps(entry["depths"]), entry.get("n_v")])
                if policies and name in policies:
                    log_policy_heatmap(run, policies[name], results["num_layers"], list(results["groups"]),
                                       key=f"search/{name}/policy",
                                       path=Path(run_dir) / "policies" / f"{name}.png")
            log_table(run, "search/budgets", ["budget", "predicted_kl", "measured_kl", "ratio", "tflops",
                                              "depths", "n_v"], rows)
            check = results.get("additive_check")
            if check:
                log_metrics(run, {"search/additive/pearson": check["pearson"],
                                  "search/additive/spearman": check["spearman"]})
    except Exception as exc:  # a mirror failing must not fail the search
        log.warning("W&B logging skipped: %s", exc)
