"""The additive estimate: a policy's predicted KL is the sum of its parameters' single-change
values; ``check_additive`` measures how well that predicts the joint divergence."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from dop.search.solution import SearchError
from dop.space import Pair, pair_key


def predict_kl(curves: Mapping[Pair, Sequence[float]], depths: Mapping[Pair, int]) -> float:
    """The additive estimate: sum over pairs of the single-change KL at the pair's depth."""
    total = 0.0
    for pair, depth in depths.items():
        if pair not in curves:
            raise SearchError(f"no divergence curve for pair {pair_key(pair)}")
        total += float(curves[pair][depth])
    return total

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
