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

Modules: ``cost`` (CostModel), ``exact`` (solve_exact, solve_joint), ``greedy``
(greedy_search, accuracy_greedy_search), ``additive`` (predict_kl, check_additive),
``solution`` (Solution, SearchError, InfeasibleBudgetError), ``problem`` (SearchProblem: curves,
cost models and budgets of one model, solved by any of the solvers).

Owns: the solvers over a finished sweep's curves. May import: the concepts (``dop.space``,
``dop.policy``, ``dop.flops``, ``dop.budget``); never the sweep, the engine or the evaluation
(the search stage, ``dop.stages.search``, wires them together).
"""

from dop.search.additive import check_additive, predict_kl, random_depth_policies
from dop.search.cost import CostModel
from dop.search.exact import solve_exact, solve_joint
from dop.search.greedy import OBJECTIVES, AccuracyFn, accuracy_greedy_search, greedy_search
from dop.search.problem import SearchProblem, Solver
from dop.search.solution import REL_TOL, InfeasibleBudgetError, SearchError, Solution

__all__ = ["OBJECTIVES", "REL_TOL", "AccuracyFn", "CostModel", "InfeasibleBudgetError", "SearchError", "SearchProblem", "Solution", "Solver",
           "accuracy_greedy_search", "check_additive", "greedy_search",
           "predict_kl", "random_depth_policies", "solve_exact", "solve_joint"]
