"""The main job end to end on the embedded tiny model (few samples), and its bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dop.models import TINY_LLAVA_DIR
from dop.policy import Policy
from dop.stages import CONF_DIR, STAGES
from dop.stages.config import PipelineStage, load
from dop.stages.pipeline import RunDirError, check_run_dir

needs_tiny = pytest.mark.skipif(not (TINY_LLAVA_DIR / "config.json").exists(), reason="tiny_llava not shipped")


def _cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[
            f"paths.output_dir={tmp / 'out'}", f"paths.run_dir={tmp / 'run'}", "logger=none",
            "data.sizes.train=16", "data.sizes.val=32", "data.sizes.test=200", *overrides])


@needs_tiny
def test_pipeline_end_to_end(tmp_path):
    from dop.stages.pipeline import run

    cfg = _cfg(tmp_path, "method.num_calibration=32", "sweep.progress_bar=false")
    out = run(cfg)
    run_dir = tmp_path / "run"
    for name in ("search.json", "summary.md", "result.json", "pipeline.json", "report/report.md",
                 "report/report.csv", "report/accuracy_vs_tflops.png"):
        assert (run_dir / name).exists(), name
    search = json.loads((run_dir / "search.json").read_text())
    dense_flops = search["dense_flops"]
    for value in (0.5, 0.35, 0.25):
        name = f"ratio_{value}"
        entry = search["budgets"][name]
        assert entry["flops"] <= value * dense_flops + 1e-6
        policy = Policy.from_yaml(run_dir / "policies" / f"{name}.yaml")
        assert not policy.is_identity and policy.num_layers == search["num_layers"]
        assert entry["measured_kl"] is not None and entry["measured_kl"] >= 0
    records = out["records"]
    dense = [r for r in records if r["method"] == "dense"]
    assert len(dense) == 1 and dense[0]["value"] >= 0.9 and dense[0]["samples"] == 200
    found = {r["budget_value"]: r["value"] for r in records if r["method"] == "dop"}
    assert found[0.5] >= dense[0]["value"] - 0.02  # the 50% policy keeps accuracy within 2 points
    budgets = sorted(r["budget_value"] for r in records if r["method"] == "dop")
    assert budgets == [0.25, 0.35, 0.5]
    for r in records:  # the searched policy re-solved on each sample's own sizes, within its own budget
        extra = r["extra"]
        if r["method"] == "dop":
            flops = extra["per_sample_flops"]
            assert extra["resolver"] == "PolicyResolver" and flops["n"] == 200 and flops["over_budget"] == 0
            assert flops["unreachable"] == 0 and flops["max_share"] <= r["budget_value"] + 1e-9
    report = (run_dir / "report" / "report.md").read_text()
    for value in ("0.5", "0.35", "0.25"):
        assert value in report
    # ... and beats the uniform-depth and random depth policies of the same FLOPs
    from dop.evaluation.scoring import compare_on_synthetic
    from dop.models import load_model
    from dop.search.reference import reference_policies
    from dop.space import parse_pair

    model, processor = load_model("tiny_llava")
    refs = reference_policies(model.config.get_text_config(), search["groups"],
                              [parse_pair(p) for p in search["pairs"]], search["num_layers"],
                              search["budgets"]["ratio_0.5"]["budget"]["flops"], n_random=3)
    acc = compare_on_synthetic(model, processor, tmp_path / "out" / "data" / "synthetic",
                               {k: p for k, (p, _) in refs.items()})
    assert found[0.5] > acc["uniform"] and found[0.5] > max(v for k, v in acc.items() if k.startswith("random"))
    # a rerun resumes: nothing is recomputed, same policies
    again = run(cfg)
    assert again["search"]["budgets"]["ratio_0.5"]["depths"] == search["budgets"]["ratio_0.5"]["depths"]


def test_run_dir_of_another_config_is_refused(tmp_path):
    def conf(*overrides):
        return load(PipelineStage, _cfg(tmp_path, *overrides))

    check_run_dir(tmp_path, conf())
    check_run_dir(tmp_path, conf("budget.values=[0.3]"))  # budgets may change
    with pytest.raises(RunDirError, match="differs in model"):
        check_run_dir(tmp_path, conf("model=llava15_7b"))


def test_every_stage_resolves():
    from dop.cli import resolve_stage

    for name in STAGES:
        assert callable(resolve_stage(name))


def test_bad_cli_input_gives_one_line_errors(tmp_path):
    dop = [sys.executable, "-m", "dop.cli"]
    res = subprocess.run([*dop, "stage=nope"], capture_output=True, text=True)
    assert res.returncode != 0 and "unknown stage 'nope'; valid stages: pipeline" in res.stderr
    res = subprocess.run([*dop, "model=nope", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True)
    assert res.returncode != 0 and "Could not find 'model/nope'" in res.stderr and "tiny_llava" in res.stderr
    res = subprocess.run([*dop, "budget=nope", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True)
    assert res.returncode != 0 and "Could not find 'budget/nope'" in res.stderr and "ratio" in res.stderr
