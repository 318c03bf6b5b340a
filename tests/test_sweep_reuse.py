"""Prefix reuse gives the naive divergences (within 1e-6) for fewer layer forwards."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("dop.engine")

from test_sweep_store import tiny_job  # noqa: E402


@pytest.mark.parametrize("layers", [4])
def test_reuse_equals_naive_with_counted_saving(tmp_path, layers):
    torch.set_num_threads(1)
    results = {}
    for mode in ("none", "prefix", "half_layer"):
        job = tiny_job(tmp_path / mode, layers=layers, reuse=mode)
        stats = job.run()
        results[mode] = (stats, {p.key: job.store.read(p) for p in job.points()})
    naive = results["none"][1]
    for mode in ("prefix", "half_layer"):
        for key, doc in results[mode][1].items():
            assert doc["kl"] == pytest.approx(naive[key]["kl"], abs=1e-6), (mode, key)
            assert doc["kl_per_sample"] == pytest.approx(naive[key]["kl_per_sample"], abs=1e-6)
    L = layers
    assert results["none"][0]["reuse_ratio"] == 1.0
    assert results["prefix"][0]["reuse_ratio"] == pytest.approx((L + 1) / (2 * L))
    # half layer: q/mlp points skip the attention half of their first layer; q/mlp points of
    # groups without the scored position cost nothing at the last layer
    assert results["half_layer"][0]["reuse_ratio"] <= 0.55


def test_measured_policy_kl_matches_naive(tmp_path):
    from dop.policy import DepthPolicy

    torch.set_num_threads(1)
    policy = DepthPolicy({("kv", "vision"): 2, ("mlp", "instruction"): 3, ("q", "system"): 1}).expand(4)
    a = tiny_job(tmp_path / "a", layers=4, reuse="none").measure_kl(policy)
    b = tiny_job(tmp_path / "b", layers=4, reuse="half_layer").measure_kl(policy)
    assert a == pytest.approx(b, abs=1e-6) and a > 0


def test_tied_attention_sweep(tmp_path):
    torch.set_num_threads(1)
    job = tiny_job(tmp_path, layers=3, pairs=[("attn", "vision"), ("mlp", "vision")])
    job.run()
    assert (tmp_path / "sweep" / "attn_vision" / "0.json").exists()
    curves = job.store.curves(job.pairs, 3)
    assert curves[("attn", "vision")][3] == 0 and curves[("attn", "vision")][0] > 0
