"""The benchmark registry (conf/benchmark): every file valid, unknown names and missing keys fail early."""

from __future__ import annotations

import pytest

from dop.evaluation.benchmarks import BENCHMARK_DIR, BenchmarkError, known, resolve

PAPER13 = ["gqa", "mmbench_en_dev", "mmbench_cn_dev", "mme", "pope", "scienceqa_img", "vqav2_val",
           "textvqa_val", "vizwiz_vqa_val", "mmmu_val", "seedbench", "ocrbench", "ok_vqa_val2014"]


def test_every_benchmark_file_resolves():
    assert set(PAPER13) | {"paper13", "synthetic"} <= set(known())
    for name in known():
        for b in resolve(name, check=False):
            assert b.tasks and b.metric and b.metric in b.recorded_metrics


def test_paper13_has_the_13_benchmarks():
    assert [b.name for b in resolve("paper13", check=False)] == PAPER13


def test_unknown_benchmark_lists_known_ones():
    with pytest.raises(BenchmarkError, match=r"unknown benchmark 'mmeee'.*known benchmarks: .*pope"):
        resolve("mmeee")


def test_api_key_benchmark_fails_before_running():
    with pytest.raises(BenchmarkError, match="OPENAI_API_KEY"):
        resolve("mmbench_en_dev", env={})
    assert resolve("mmbench_en_dev", env={"OPENAI_API_KEY": "x"})[0].tasks == ("mmbench_en_dev",)
    with pytest.raises(BenchmarkError, match="OPENAI_API_KEY"):
        resolve("paper13", env={})
    assert resolve("pope", env={})[0].metric == "pope_f1_score"


def test_tasks_exist_in_lmms_eval():
    pytest.importorskip("lmms_eval")
    from pathlib import Path

    import lmms_eval

    text = "\n".join(p.read_text(errors="ignore") for p in Path(lmms_eval.__file__).parent.joinpath("tasks").rglob("*.yaml"))
    for name in PAPER13:
        for task in resolve(name, check=False)[0].tasks:
            assert f"task: {task}" in text or f'task: "{task}"' in text, task


def test_mme_total_is_perception_plus_cognition():
    (mme,) = resolve("mme")
    values = mme.metric_values({"mme": {"mme_perception_score,none": 1500.0, "mme_cognition_score,none": 350.5}})
    assert values == {"mme_perception_score": 1500.0, "mme_cognition_score": 350.5, "mme_total": 1850.5}


def test_synthetic_config_composes_with_paths():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"data": {"path": "/d/synthetic"}, "benchmark": OmegaConf.load(BENCHMARK_DIR / "synthetic.yaml")})
    (b,) = resolve(cfg.benchmark)
    assert b.tasks == ("dop_synthetic",) and b.metric == "exact_match" and b.dataset_path == "/d/synthetic"
