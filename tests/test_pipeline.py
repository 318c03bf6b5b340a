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
    """The main job as `make run` composes it (tiny_llava, its 12/8/6-token budgets): DOP, the uniform-depth
    policy and the three default baselines at every budget, each at or below it, in the records, the
    summary and the report; DOP beats the uniform depth and random depth policies of its FLOPs."""
    from dop.stages.pipeline import run

    cfg = _cfg(tmp_path, "method.num_calibration=32", "sweep.progress_bar=false")
    out = run(cfg)
    run_dir = tmp_path / "run"
    for name in ("search.json", "summary.md", "result.json", "pipeline.json", "report/report.md",
                 "report/report.csv", "report/accuracy_vs_tflops.png"):
        assert (run_dir / name).exists(), name
    search = json.loads((run_dir / "search.json").read_text())
    budgets = [12.0, 8.0, 6.0]
    for value in budgets:
        name = f"tokens_{int(value)}"
        entry = search["budgets"][name]
        assert entry["flops"] <= entry["budget"]["flops"] * (1 + 1e-9)
        policy = Policy.from_yaml(run_dir / "policies" / f"{name}.yaml")
        assert not policy.is_identity and policy.num_layers == search["num_layers"]
        assert entry["measured_kl"] is not None and entry["measured_kl"] >= -1e-6  # float noise around 0 (store bound: -1e-5)
        assert (run_dir / "report" / f"policy_{name}.png").stat().st_size > 0  # the policy as a picture
    records = out["records"]
    dense = [r for r in records if r["method"] == "dense"]
    assert len(dense) == 1 and dense[0]["value"] >= 0.9 and dense[0]["samples"] == 200
    methods = ["dop", "uniform", "fastv", "pdrop", "vispruner"]
    value = {(r["method"], r["budget_value"]): r for r in records if r["method"] != "dense"}
    assert set(value) == {(m, b) for m in methods for b in budgets}, sorted(value)
    for (method, budget), r in value.items():  # every sample of every method at or below its own budget
        flops = r["extra"]["per_sample_flops"]
        assert flops["n"] == 200 and flops["over_budget"] == 0 and flops["unreachable"] == 0, (method, budget)
        assert r["tflops"] == flops["mean_tflops"] and flops["max_share"] < 1
        resolver = "BaselineResolver" if method in ("fastv", "pdrop", "vispruner") else "PolicyResolver"
        assert r["extra"]["resolver"] == resolver, (method, budget)  # DOP and uniform re-solved per sample
    for budget in budgets:
        assert value[("dop", budget)]["value"] >= value[("uniform", budget)]["value"]
    assert value[("dop", 12.0)]["value"] >= dense[0]["value"] - 0.02  # 0.89 of dense keeps accuracy
    report = (run_dir / "report" / "report.md").read_text()
    for method in methods:
        assert report.count(f"| {method} |") == 3, method
    summary = (run_dir / "summary.md").read_text()
    assert "MFLOPs" in summary and "TFLOPs" not in summary
    flops_cells = [line.split("|")[3] for line in summary.splitlines()[2:] if line.startswith("| ")]
    assert flops_cells and not any("e" in c for c in flops_cells)  # 110.1, not 1.101e-04
    for method in methods:
        assert summary.count(f"| {method} |") == 3, method
    # ... and beats random depth policies of the same FLOPs
    from dop.evaluation.scoring import compare_on_synthetic
    from dop.models import load_model
    from dop.search.reference import reference_policies
    from dop.space import parse_pair

    model, processor = load_model("tiny_llava")
    refs = reference_policies(model.config.get_text_config(), search["groups"],
                              [parse_pair(p) for p in search["pairs"]], search["num_layers"],
                              search["budgets"]["tokens_6"]["budget"]["flops"], n_random=3)
    acc = compare_on_synthetic(model, processor, tmp_path / "out" / "data" / "synthetic",
                               {k: p for k, (p, _) in refs.items() if k.startswith("random")})
    assert value[("dop", 6.0)]["value"] > max(acc.values())
    # a rerun resumes: nothing is recomputed, same policies
    again = run(cfg)
    assert again["search"]["budgets"]["tokens_6"]["depths"] == search["budgets"]["tokens_6"]["depths"]


def test_run_dir_of_another_config_is_refused(tmp_path):
    def conf(*overrides):
        return load(PipelineStage, _cfg(tmp_path, *overrides))

    check_run_dir(tmp_path, conf())
    check_run_dir(tmp_path, conf("budget.values=[0.3]"))  # budgets may change
    with pytest.raises(RunDirError, match="differs in model"):
        check_run_dir(tmp_path, conf("model=llava15_7b"))


def test_help_is_dops_and_lists_every_stage():
    res = subprocess.run([sys.executable, "-m", "dop.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("dop: operation-pruning policies")
    assert "powered by Hydra" not in res.stdout
    stages = res.stdout.split("== Stages", 1)[1].split("== Common overrides", 1)[0]
    for name in STAGES:
        assert f"\n  {name} " in stages, name
    examples = res.stdout.split("== Examples ==", 1)[1].split("== Configuration groups", 1)[0]
    assert examples.count("\n  dop") == 3 and "launcher=slurm" in examples
    assert "model: " in res.stdout and "tiny_llava" in res.stdout  # then the config groups


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
