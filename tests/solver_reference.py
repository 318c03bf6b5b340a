"""The solver's independent reference: enumerate every depth vector (tiny instances only)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dop.search import REL_TOL, CostModel, InfeasibleBudgetError, Solution
from dop.space import Pair, curves_array


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
    limit = budget_flops * (1 + REL_TOL) + REL_TOL * cost.dense
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
