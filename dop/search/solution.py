"""What a search returns (``Solution``) and how it fails (``SearchError``, ``InfeasibleBudgetError``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dop.budget import BudgetError
from dop.errors import DopError
from dop.policy import DepthPolicy
from dop.space import Pair

REL_TOL = 1e-12  # FLOPs comparisons: the cost model and count_flops sum in different orders


class SearchError(DopError, ValueError):
    """The search cannot run: bad sweep data, unsupported cost model, or no feasible policy."""

class InfeasibleBudgetError(SearchError, BudgetError):
    """No depth policy fits the budget; ``min_flops`` is the cheapest one reachable."""

    def __init__(self, message: str, min_flops: float) -> None:
        super().__init__(message)
        self.min_flops = min_flops

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
