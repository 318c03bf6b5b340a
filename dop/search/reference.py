"""Simple policies of the same FLOPs as a found one: uniform depth and random depths.

A search result is only worth something if it beats the obvious alternatives in the same policy
space at the same cost (``dop stage=compare`` scores them against the found policies):

- ``uniform``: every searched pair at one depth D (the largest-FLOPs D within the budget);
- ``random_i``: depth policies drawn at random (uniform depths per pair) whose FLOPs fall in
  ``[lo * budget, budget]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dop.flops import count_flops
from dop.policy import DepthPolicy, Policy
from dop.space import Pair


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
    uniform = uniform_policy(text_config, groups, pairs, num_layers, budget_flops)
    if uniform is not None:
        out["uniform"] = uniform
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


def uniform_policy(text_config: Any, groups: Mapping[str, float], pairs: Sequence[Pair], num_layers: int,
                   budget_flops: float) -> tuple[Policy, float] | None:
    """Every searched pair at one depth D, the deepest (least pruning) D whose FLOPs fit the budget;
    None when even D = 0 does not fit."""
    for depth in range(num_layers, -1, -1):
        policy = DepthPolicy({p: depth for p in pairs}).expand(num_layers)
        flops = count_flops(text_config, groups, policy)
        if flops <= budget_flops:
            return policy, float(flops)
    return None
