"""Greedy baselines of the exact solver: GSOP-style greedy on the additive KL estimate, and GSOP's
greedy on measured calibration accuracy (``objective=accuracy``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dop.policy import DepthPolicy, Policy
from dop.search.cost import CostModel
from dop.search.solution import REL_TOL, InfeasibleBudgetError, SearchError, Solution
from dop.space import Pair, curves_array, pair_key

OBJECTIVES = ("kl", "accuracy")
AccuracyFn = Callable[[Mapping[str, Policy]], Mapping[str, float]]  # {name: policy} -> {name: accuracy}


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
    limit = budget_flops * (1 + REL_TOL)
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
    limit = budget_flops * (1 + REL_TOL)
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
                if saved > REL_TOL * cost.dense:
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
