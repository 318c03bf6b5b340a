"""stage=search / sweep / merge end to end on a tiny random LLaVA (the sweep runs when missing)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("dop.engine")
pytest.importorskip("dop.flops")

from stage_configs import compose_cfg, stage_conf  # noqa: E402
from test_sweep_store import tiny_job  # noqa: E402

import dop.search as search  # noqa: E402
import dop.stages.search as search_stage  # noqa: E402
import dop.stages.sweep as sweep_stage  # noqa: E402
from dop.policy import DepthPolicy, Policy  # noqa: E402
from dop.stages.config import SearchStage, SweepStage  # noqa: E402
from dop.stages.schema import ConfigError  # noqa: E402


def _conf(run_dir, *overrides):
    return stage_conf(SearchStage, run_dir, "method.check_additive=4", "budget=ratio", "budget.values=[0.6,0.4]",
                      *overrides)


def test_search_stage_writes_policies_and_summary(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    job = tiny_job(tmp_path, layers=3)
    out = search_stage.execute(_conf(tmp_path), job=job)
    assert job.last_stats["computed"] == len(job.points())  # the sweep ran because it was missing
    summary = json.loads((tmp_path / "search.json").read_text())
    assert set(summary["budgets"]) == {"ratio_0.6", "ratio_0.4"} == set(out["budgets"])
    for name, entry in summary["budgets"].items():
        assert entry["ratio"] <= entry["budget"]["value"] + 1e-12
        assert entry["measured_kl"] is not None and entry["predicted_kl"] >= 0
        assert entry["tflops"] == pytest.approx(entry["flops"] / 1e12)
        policy = Policy.from_yaml(tmp_path / "policies" / f"{name}.yaml")
        depth = DepthPolicy.from_yaml(tmp_path / "policies" / f"{name}.yaml")
        assert policy == depth.expand(3) and policy.meta["depths"] == entry["depths"]
    assert summary["additive_check"]["n"] == 4
    # a second search reuses the finished sweep
    search_stage.execute(_conf(tmp_path), job=job)
    assert job.last_stats["computed"] == 0


def test_sweep_and_merge_stages(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    jobs = {k: tiny_job(tmp_path / f"s{k}", layers=3, shard=k, num_shards=2) for k in range(2)}
    for k in range(2):
        monkeypatch.setattr(sweep_stage, "build_job", lambda conf, k=k: jobs[k])
        assert sweep_stage.execute(stage_conf(SweepStage, tmp_path / f"s{k}"))["points"] > 0
    cfg = compose_cfg(tmp_path / "merged", f"sweep.merge_from=[{tmp_path / 's0'},{tmp_path / 's1'}]")
    report = sweep_stage.run_merge(cfg)
    assert report["complete"] and (tmp_path / "merged" / "sweep" / "merge.json").exists()


def test_unknown_solver_and_infeasible_budget(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    job = tiny_job(tmp_path, layers=3, pairs=[("kv", "vision")])
    with pytest.raises(ConfigError, match="method.solver='magic' is not valid; valid: exact, greedy"):
        _conf(tmp_path, "method.solver=magic")
    conf = _conf(tmp_path, "budget.values=[0.3]")  # sensible, but only vision kv searched: far below reach
    with pytest.raises(search.InfeasibleBudgetError, match="cheapest policy this search space reaches"):
        search_stage.execute(conf, job=job)
    conf = _conf(tmp_path, "budget.values=[0.01]")  # below any sensible policy: refused before the sweep
    with pytest.raises(ConfigError, match="below the cheapest sensible policy"):
        search_stage.execute(conf, job=job)
