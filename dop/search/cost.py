"""The cost model: exact per-layer FLOPs of a depth policy as a function of the kept parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dop.flops import count_flops, text_shape
from dop.ops import OP_TYPES, Operation, OpType
from dop.policy import DEFAULT_OUTPUT_GROUPS, DepthPolicy, Policy
from dop.search.solution import SearchError
from dop.space import Pair, pair_key, pair_ops, pair_type


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
        num_layers = text_shape(text_config).num_layers

        def count(policy: Policy) -> float:
            return count_flops(text_config, groups, policy, convention=convention)

        return cls.from_counter(count, num_layers, list(groups), pairs, output_groups=output_groups,
                                verify=verify)
