"""The exact budgeted solver equals brute force; greedy and the additive check behave."""

from __future__ import annotations

import time

import numpy as np
import pytest
from solver_reference import brute_force

from dop.budget import Budget
from dop.policy import DepthPolicy, Policy
from dop.search import (
    CostModel,
    InfeasibleBudgetError,
    SearchError,
    check_additive,
    greedy_search,
    predict_kl,
    solve_exact,
)
from dop.space import all_pairs, interpolate_curve

LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
PAPER_GROUPS = {"system": 35, "vision": 576, "instruction": 100}


def stand_in_counter(num_layers: int, sizes: dict[str, int], rng: np.random.Generator):
    """A FLOPs counter with count_flops' structure (linear rows + n_q * n_kv per layer) but random,
    layer-dependent coefficients, so the solver is not tuned to one shape."""
    lin = rng.uniform(1, 5, size=(num_layers, 3))
    quad = rng.uniform(0.001, 0.05, size=num_layers)

    def count(policy: Policy) -> float:
        total = 0.0
        for v in range(num_layers):
            n = {t: sum(s for g, s in sizes.items() if not policy.is_pruned(v, g, t)) for t in ("q", "kv", "mlp")}
            total += lin[v, 0] * n["q"] + lin[v, 1] * n["kv"] + lin[v, 2] * n["mlp"] + quad[v] * n["q"] * n["kv"]
        return total

    return count


def random_curves(rng, pairs, num_layers, allow_gaps=True):
    curves = {}
    for p in pairs:
        c = rng.uniform(0, 1, num_layers + 1) * rng.choice([0.1, 1, 10])
        if rng.random() < 0.5:  # monotone like real curves
            c = np.sort(c)[::-1].copy()
        c[num_layers] = 0.0 if rng.random() < 0.8 else c[num_layers]
        if allow_gaps and rng.random() < 0.3:  # a sparse grid: some depths not allowed
            c[rng.integers(0, num_layers)] = np.inf
        curves[p] = c
    return curves


@pytest.mark.parametrize("seed", range(12))
def test_exact_equals_brute_force_stand_in(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 4))
    groups = ["system", "vision", "instruction"][: int(rng.integers(2, 4))]
    sizes = {g: int(rng.integers(1, 30)) for g in groups}
    types = list(rng.choice(["q", "kv", "mlp"], size=int(rng.integers(2, 4)), replace=False))
    pairs = all_pairs(groups, types)
    if len(pairs) > 7:
        pairs = pairs[:7]
    count = stand_in_counter(L, sizes, rng)
    cost = CostModel.from_counter(count, L, groups, pairs)
    curves = random_curves(rng, pairs, L)
    lo, hi = cost.cost([0] * len(pairs)), cost.cost([L] * len(pairs))
    for frac in (0.2, 0.5, 0.8, 1.0):
        budget = lo + frac * (hi - lo)
        want = brute_force(curves, cost, budget,
                           count=lambda d: count(DepthPolicy(dict(zip(pairs, d))).expand(L)))
        got = solve_exact(curves, cost, budget)
        assert got.predicted_kl == pytest.approx(want.predicted_kl, abs=1e-12)
        assert got.flops <= budget * (1 + 1e-12)
        # the solver's own FLOPs equal the counter on the expanded policy
        assert count(DepthPolicy(got.depths).expand(L)) == pytest.approx(got.flops, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_exact_equals_brute_force_count_flops(seed):
    rng = np.random.default_rng(100 + seed)
    L = 3
    text = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=L, num_attention_heads=4,
                num_key_value_heads=2)
    groups = {"system": 5, "vision": 16, "instruction": 9}
    pairs = all_pairs(groups, ["q", "kv"])
    cost = CostModel.from_flops(text, groups, pairs)
    from dop.flops import count_flops

    curves = random_curves(rng, pairs, L, allow_gaps=False)
    for ratio in (0.3, 0.6, 0.9):
        budget = ratio * cost.dense
        want = brute_force(curves, cost, budget,
                           count=lambda d: count_flops(text, groups, DepthPolicy(dict(zip(pairs, d))).expand(L)))
        got = solve_exact(curves, cost, budget)
        assert got.predicted_kl == pytest.approx(want.predicted_kl, abs=1e-12)
        assert count_flops(text, groups, DepthPolicy(got.depths).expand(L)) <= budget * (1 + 1e-12)


def paper_curves(seed=0):
    rng = np.random.default_rng(seed)
    L = 32
    d = np.arange(L + 1)
    curves = {}
    for p in all_pairs(PAPER_GROUPS):
        c = rng.uniform(0.5, 5) * np.exp(-d / rng.uniform(3, 10)) * (1 - d / L)
        curves[p] = c + rng.uniform(0, 0.01, L + 1) * (1 - d / L)
    return curves


def test_paper_size_under_one_second():
    pytest.importorskip("dop.flops")
    from dop.flops import flops_for_tokens

    cost = CostModel.from_flops(LLAMA7B, PAPER_GROUPS, all_pairs(PAPER_GROUPS))
    curves = paper_curves()
    for k in (192, 128, 64):
        budget = flops_for_tokens(LLAMA7B, PAPER_GROUPS, k)
        t = time.perf_counter()
        sol = solve_exact(curves, cost, budget)
        assert time.perf_counter() - t < 1.0
        assert sol.flops <= budget
        greedy = greedy_search(curves, cost, budget)
        assert greedy.flops <= budget
        assert sol.predicted_kl <= greedy.predicted_kl + 1e-12  # exact is never worse


def test_greedy_feasible_and_bounded_by_exact():
    rng = np.random.default_rng(7)
    L, groups = 3, ["vision", "instruction"]
    pairs = all_pairs(groups)
    count = stand_in_counter(L, {"vision": 20, "instruction": 6}, rng)
    cost = CostModel.from_counter(count, L, groups, pairs)
    curves = random_curves(rng, pairs, L, allow_gaps=False)
    budget = 0.5 * cost.dense
    g, e = greedy_search(curves, cost, budget), solve_exact(curves, cost, budget)
    assert g.flops <= budget and e.predicted_kl <= g.predicted_kl + 1e-12


def test_infeasible_budget_names_smallest_reachable():
    rng = np.random.default_rng(1)
    L, groups = 2, ["vision", "instruction"]
    pairs = [("kv", "vision"), ("q", "vision")]  # instruction stays dense: a floor on FLOPs
    cost = CostModel.from_counter(stand_in_counter(L, {"vision": 10, "instruction": 5}, rng), L, groups, pairs)
    floor = cost.cost([0, 0])
    with pytest.raises(InfeasibleBudgetError, match="cheapest policy") as err:
        solve_exact(random_curves(rng, pairs, L, allow_gaps=False), cost, 0.5 * floor)
    assert err.value.min_flops == pytest.approx(floor)


def test_group_the_model_lacks():
    with pytest.raises(SearchError, match="not a token group"):
        CostModel.from_counter(lambda p: 1.0, 2, ["vision"], [("kv", "audio")])


def test_non_bilinear_counter_is_refused():
    def count(policy: Policy) -> float:  # cubic in kept rows: not the structure the solver uses
        n = [sum(1 for g in ("a", "b") if not policy.is_pruned(v, g, "q")) + 1 for v in range(2)]
        return float(sum(x**3 for x in n))

    with pytest.raises(SearchError, match="bilinear"):
        CostModel.from_counter(count, 2, ["a", "b"], all_pairs(["a", "b"], ["q"]))


def test_interpolation_monotone_and_unreachable():
    c = interpolate_curve({2: 4.0, 4: 2.0, 8: 0.0}, 8)
    assert c[3] == pytest.approx(3.0) and c[6] == pytest.approx(1.0) and c[8] == 0
    assert np.all(np.diff(c[2:]) <= 0)
    assert np.isinf(c[0]) and np.isinf(c[1])


def test_additive_prediction_and_check():
    curves = {("kv", "vision"): np.array([3.0, 1.0, 0.0]), ("q", "vision"): np.array([2.0, 0.5, 0.0])}
    assert predict_kl(curves, {("kv", "vision"): 1, ("q", "vision"): 0}) == 3.0
    res = check_additive([(1, 1.1), (2, 2.3), (3, 2.9), (4, 4.5)])
    assert res["n"] == 4 and res["spearman"] == pytest.approx(1.0) and res["pearson"] > 0.95


def test_budget_kinds_resolve_against_dense():
    cost = CostModel.from_counter(lambda p: 100.0 - len(p), 1, ["vision"], [("q", "vision")])
    assert Budget("ratio", 0.5).to_flops(cost.dense) == 50.0
    assert Budget("tflops", 2).to_flops(cost.dense) == 2e12
    assert Budget("tokens", 64).to_flops(cost.dense, lambda k: 10.0 * k) == 640.0


def test_solution_policy_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    L, groups = 3, ["vision", "instruction"]
    pairs = all_pairs(groups)
    cost = CostModel.from_counter(stand_in_counter(L, {"vision": 12, "instruction": 4}, rng), L, groups, pairs)
    sol = solve_exact(random_curves(rng, pairs, L, allow_gaps=False), cost, 0.6 * cost.dense)
    policy = sol.depth_policy(L).expand(L)
    policy.to_yaml(tmp_path / "p.yaml")
    back = Policy.from_yaml(tmp_path / "p.yaml")
    assert back == policy
    assert DepthPolicy.from_yaml(tmp_path / "p.yaml") == sol.depth_policy(L)


@pytest.mark.parametrize("seed", range(4))
def test_tied_attention_parameter_equals_brute_force(seed):
    rng = np.random.default_rng(50 + seed)
    L, groups = 3, ["system", "vision", "instruction"]
    sizes = {g: int(rng.integers(1, 30)) for g in groups}
    pairs = [("attn", "vision"), ("mlp", "vision"), ("attn", "instruction"), ("kv", "system")]
    count = stand_in_counter(L, sizes, rng)
    cost = CostModel.from_counter(count, L, groups, pairs)
    curves = random_curves(rng, pairs, L, allow_gaps=False)
    budget = 0.5 * cost.dense
    want = brute_force(curves, cost, budget, count=lambda d: count(DepthPolicy(dict(zip(pairs, d))).expand(L)))
    got = solve_exact(curves, cost, budget)
    assert got.predicted_kl == pytest.approx(want.predicted_kl, abs=1e-12)
    expanded = DepthPolicy(got.depths).expand(L)
    d = got.depths[("attn", "vision")]
    assert all(expanded.is_pruned(v, "vision", "q") and expanded.is_pruned(v, "vision", "kv") for v in range(d, L))
    assert count(expanded) == pytest.approx(got.flops, rel=1e-12)


def test_overlapping_parameters_refused():
    with pytest.raises(SearchError, match="overlap"):
        CostModel.from_counter(lambda p: 1.0, 2, ["vision"], [("attn", "vision"), ("q", "vision")])


@pytest.mark.parametrize("shape", ["zero", "linear"])
def test_degenerate_curves_stay_exact(shape):
    rng = np.random.default_rng(11)
    L, groups = 3, ["vision", "instruction"]
    pairs = all_pairs(groups)
    count = stand_in_counter(L, {"vision": 16, "instruction": 5}, rng)
    cost = CostModel.from_counter(count, L, groups, pairs)
    d = np.arange(L + 1)
    curves = {p: (np.zeros(L + 1) if shape == "zero" else (1 - d / L) * (i + 1)) for i, p in enumerate(pairs)}
    for ratio in (0.3, 0.7):
        want = brute_force(curves, cost, ratio * cost.dense)
        got = solve_exact(curves, cost, ratio * cost.dense)
        assert got.predicted_kl == pytest.approx(want.predicted_kl, abs=1e-12)
        assert got.flops <= ratio * cost.dense * (1 + 1e-12)


def test_sparse_grid_interpolated_curves():
    rng = np.random.default_rng(5)
    L, groups = 4, ["vision", "instruction"]
    pairs = all_pairs(groups, ["q", "kv"])
    cost = CostModel.from_counter(stand_in_counter(L, {"vision": 16, "instruction": 5}, rng), L, groups, pairs)
    curves = {p: interpolate_curve({0: float(rng.uniform(1, 3)), 2: float(rng.uniform(0, 1)), 4: 0.0}, L)
              for p in pairs}
    want, got = brute_force(curves, cost, 0.5 * cost.dense), solve_exact(curves, cost, 0.5 * cost.dense)
    assert got.predicted_kl == pytest.approx(want.predicted_kl, abs=1e-12)
