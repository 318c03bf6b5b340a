"""Policies: expansion, dead operations, serialisation, validation."""

from __future__ import annotations

import pytest

from dop.ops import Operation, OpType
from dop.policy import DepthPolicy, Policy, PolicyError


def test_identity_and_set_semantics():
    assert Policy().is_identity and len(Policy()) == 0
    p = Policy([Operation(1, "vision", "kv"), Operation(1, "vision", OpType.KV)])
    assert len(p) == 1 and p.is_pruned(1, "vision", "kv") and not p.is_pruned(0, "vision", "kv")
    assert p.pruned_groups(1, "kv") == {"vision"}


def test_depth_policy_expands_every_deeper_layer():
    d = DepthPolicy({("mlp", "vision"): 2, "q/system": 3})
    p = d.expand(num_layers=4, dead_ops=False)
    assert {(o.layer, o.group, o.type.value) for o in p} == {
        (2, "vision", "mlp"), (3, "vision", "mlp"), (3, "system", "q")}
    assert d.expand(4, dead_ops=False) == DepthPolicy({("mlp", "vision"): 2, ("q", "system"): 3,
                                                        ("kv", "vision"): 4}).expand(4, dead_ops=False)


def test_attn_ties_q_and_kv():
    d = DepthPolicy({("attn", "vision"): 1})
    assert d.depth("q", "vision") == 1 and d.depth("kv", "vision") == 1


def test_dead_ops_follow_a_pruned_kv_side():
    # kv of vision pruned from layer 2: its q and mlp from layer 2 change nothing that is read.
    p = DepthPolicy({("kv", "vision"): 2}).expand(4)
    assert {(o.layer, o.type.value) for o in p if o.group == "vision"} == {
        (layer, t) for layer in (2, 3) for t in ("q", "kv", "mlp")}
    # ... but never for the group whose last position is read.
    p = DepthPolicy({("kv", "instruction"): 2}).expand(4)
    assert {o.type.value for o in p} == {"kv"}
    # A hand-written policy with kv pruned only at layer 1 (not all deeper layers) has no dead ops.
    hand = Policy([Operation(1, "system", "kv")]).with_dead_ops(4)
    assert len(hand) == 1


def test_round_trips(tmp_path):
    p = DepthPolicy({("kv", "vision"): 2, ("mlp", "system"): 1}, num_layers=4, model="m").expand()
    path = tmp_path / "p.yaml"
    p.to_yaml(path)
    q = Policy.from_yaml(path)
    assert q == p and q.num_layers == 4 and q.model == "m" and q.digest() == p.digest()
    assert Policy.from_json(p.to_json()) == p
    assert DepthPolicy.from_yaml(path) == DepthPolicy({("kv", "vision"): 2, ("mlp", "system"): 1})
    dpath = tmp_path / "d.yaml"
    DepthPolicy({("kv", "vision"): 2}, num_layers=4).to_yaml(dpath)
    assert Policy.from_yaml(dpath) == DepthPolicy({("kv", "vision"): 2}).expand(4)


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="operation type"):
        DepthPolicy({("ffn", "vision"): 1})
    with pytest.raises(PolicyError, match="type/group"):
        DepthPolicy({"vision": 1})
    with pytest.raises(PolicyError, match="past the model's depth"):
        DepthPolicy({("kv", "vision"): 9}).expand(4)
    with pytest.raises(PolicyError, match="group 'image'"):
        Policy([Operation(0, "image", "q")]).validate(4, groups=["system", "vision", "instruction"])
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match="unknown policy field"):
        Policy.from_dict({"prunned": {}})
    with pytest.raises(ValueError, match="cannot be pruned"):
        Operation(0, "response", "q")
