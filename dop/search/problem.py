"""One model's search problem: the parameters' divergence curves, the exact FLOPs cost model at
each ``n_v`` of the front end, and the budget in FLOPs; ``solve`` runs a solver on it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dop.budget import Budget
from dop.flops import flops_for_tokens as tokens_flops
from dop.flops import front_end_groups, text_shape
from dop.policy import Policy
from dop.search.cost import CostModel
from dop.search.exact import solve_joint
from dop.search.solution import Solution
from dop.space import Pair

Solver = Callable[[Any, CostModel, float], Solution]  # (curves, cost model, budget FLOPs) -> Solution


@dataclass
class SearchProblem:
    """``curves``: per parameter, KL at every depth 0..L (None when the objective needs none);
    ``groups``: the token counts FLOPs are counted with; ``nv_curve``: KL per ``n_v`` of the front end
    (empty: no front end), ``nv_full`` the unreduced count."""

    text_config: Any
    groups: Mapping[str, float]
    pairs: Sequence[Pair]
    curves: Mapping[Pair, np.ndarray] | None
    convention: str = "dop"
    nv_curve: Mapping[int, float] = field(default_factory=dict)
    nv_full: int | None = None
    reducer: str | None = None

    def __post_init__(self) -> None:
        self.groups = dict(self.groups)
        self.cost = CostModel.from_flops(self.text_config, self.groups, self.pairs, convention=self.convention)
        self._costs: dict[int, CostModel] = {}

    @property
    def num_layers(self) -> int:
        return text_shape(self.text_config).num_layers

    def cost_at(self, n_v: int) -> CostModel:
        """The cost model with ``n_v`` visual tokens per image kept by the front end."""
        if n_v not in self._costs:
            reduced = front_end_groups(self.groups, Policy(n_v=n_v))
            self._costs[n_v] = self.cost if reduced == self.groups else CostModel.from_flops(
                self.text_config, reduced, self.pairs, convention=self.convention)
        return self._costs[n_v]

    def budget_flops(self, budget: Budget) -> float:
        """The FLOPs a budget allows: a share of the *unreduced* dense prefill for ratios."""
        return budget.to_flops(self.cost.dense, lambda k: tokens_flops(self.text_config, self.groups, k,
                                                                        convention=self.convention))

    def solve(self, budget_flops: float, solver: Solver) -> Solution:
        """The solver's policy within ``budget_flops`` (jointly over ``n_v`` with a front end)."""
        if self.nv_curve:
            return solve_joint(solver, self.curves, self.nv_curve, self.cost_at, budget_flops,
                               full=int(self.nv_full), reducer=self.reducer)
        return solver(self.curves, self.cost, budget_flops)
