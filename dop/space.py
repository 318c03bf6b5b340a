"""The search space of DOP: its parameters, their depth grid and their divergence curves.

A parameter is a (type, group) pair with one pruning depth (``DepthPolicy``); ``attn`` ties the
``q`` and ``kv`` sides of a group to one depth (the paper's D_A). The sweep measures a curve per
parameter on a depth grid, and the search reads every depth 0..L from it by interpolation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from dop.errors import DopError
from dop.ops import OP_TYPES, OpType, as_op_type

Pair = tuple[str, str]  # (type, group), e.g. ("kv", "vision")
ATTN = "attn"  # a tied parameter: q and kv of a group share one depth (the paper's D_A)


class SpaceError(DopError, ValueError):
    """A search-space parameter, grid or curve that cannot be read."""


def pair_key(pair: Pair) -> str:
    """``("kv", "vision") -> "kv_vision"`` (sweep store folder name)."""
    return f"{pair[0]}_{pair[1]}"


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
    raise SpaceError(f"pair {text!r} must be 'type_group', e.g. 'kv_vision'")


def all_pairs(groups: Iterable[str], types: Iterable[OpType | str] = OP_TYPES) -> list[tuple[str, str]]:
    """Every (type, group) pair, in a stable order."""
    return [(as_op_type(t).value, g) for g in groups for t in types]


def grid_depths(num_layers: int, step: int = 1) -> list[int]:
    """Depths 0, step, 2*step, ... and always L (the dense point)."""
    if step < 1:
        raise SpaceError(f"grid step must be >= 1, got {step}")
    return sorted(set(range(0, num_layers, step)) | {num_layers})



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
        raise SpaceError(f"curve depth {bad[0]} outside 0..{num_layers}")
    xs = np.array(sorted(pts), dtype=float)
    ys = np.array([pts[int(x)] for x in xs])
    if not np.all(np.isfinite(ys)):
        raise SpaceError(f"curve has non-finite divergences: {pts}")
    depths = np.arange(num_layers + 1, dtype=float)
    curve = np.interp(depths, xs, ys)
    curve[depths < xs[0]] = np.inf
    return curve


def curves_array(curves: Mapping[Pair, Sequence[float]], pairs: Sequence[Pair]) -> np.ndarray:
    missing = [p for p in pairs if p not in curves]
    if missing:
        raise SpaceError(f"no divergence curve for pair {pair_key(missing[0])}; sweep it first")
    return np.array([np.asarray(curves[p], dtype=float) for p in pairs])
