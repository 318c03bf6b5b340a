"""Budget parsing: kinds, values, clear errors."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from dop.budget import Budget, BudgetError, parse_budgets


def test_parse_config_and_strings():
    cfg = OmegaConf.create({"kind": "ratio", "values": [0.5, 0.35, 0.25]})
    assert [b.name for b in parse_budgets(cfg)] == ["ratio_0.5", "ratio_0.35", "ratio_0.25"]
    assert parse_budgets("tokens=128") == [Budget("tokens", 128)]
    assert parse_budgets({"kind": "tflops", "values": 4.29})[0].to_flops(1e13) == pytest.approx(4.29e12)
    assert Budget("tokens", 64).name == "tokens_64"
    assert Budget("visual_tokens", 64).kind == "tokens"


@pytest.mark.parametrize("spec, message", [
    ({"kind": "watts", "values": [1]}, "unknown budget kind"),
    ({"kind": "ratio", "values": [1.5]}, r"ratio budget must be in \(0, 1\]"),
    ({"kind": "ratio", "values": [0]}, r"ratio budget must be in \(0, 1\]"),
    ({"kind": "tflops", "values": [-1]}, "TFLOPs budget must be > 0"),
    ({"kind": "tokens", "values": [-3]}, "visual tokens"),
    ({"kind": "ratio", "values": ["half"]}, "must be a number"),
    ({"kind": "ratio", "values": []}, "empty"),
    ({"values": [0.5]}, "needs 'kind'"),
    ({"kind": "ratio"}, "needs 'values"),
    ("ratio0.5", "must look like"),
    (None, "no budget given"),
])
def test_errors(spec, message):
    with pytest.raises(BudgetError, match=message):
        parse_budgets(spec)


def test_tokens_need_a_converter():
    with pytest.raises(BudgetError, match="flops_for_tokens"):
        Budget("tokens", 64).to_flops(1e12)
