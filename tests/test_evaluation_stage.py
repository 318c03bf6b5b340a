"""`dop stage=evaluate` on a tiny saved model: records per metric, skip-if-done, failures isolated."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("lmms_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evaluation_fixtures import save_synthetic, save_tiny_llava  # noqa: E402
from stage_configs import compose_cfg  # noqa: E402

import dop.stages.config as stage_config  # noqa: E402
from dop.evaluation.benchmarks import Benchmark  # noqa: E402
from dop.results import ResultsStore  # noqa: E402
from dop.stages import evaluate as stage  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    return root, save_tiny_llava(root / "model"), save_synthetic(root / "data", n=6)


def _cfg(root, model_dir, data, policy=None, run="run", results="results", *extra):
    return compose_cfg(root / run, "stage=evaluate", "device=cpu", "model.name=tiny_test",
                       f"model.pretrained={model_dir}", "model.dtype=null", "method=dop", "benchmark=synthetic",
                       "benchmark.limit=4", "benchmark.batch_size=2", f"benchmark.dataset_path={data}",
                       f"paths.results_dir={root / results}", f"policy={policy}" if policy else "policy=null",
                       *extra, output_dir=root / "out")


def test_stage_dense_then_policy_then_skip(env):
    root, model_dir, data = env
    out = stage.run(_cfg(root, model_dir, data))
    (rec,) = ResultsStore(root / "results").records()
    assert rec.method == "dense" and rec.samples == 4 and rec.metric == "exact_match"
    assert rec.model_revision and rec.versions["lmms_eval"] != "absent" and rec.task_config_hash
    assert rec.prefill_latency_s > 0 and rec.total_latency_s > 0
    assert out["records"][0]["value"] == rec.value and (root / "run" / "result.json").is_file()
    assert (root / "run" / "samples" / "dense" / "dop_synthetic.jsonl").is_file()

    pytest.importorskip("dop.engine")
    from dop.ops import Operation
    from dop.policy import Policy

    pdir = root / "policies"
    pdir.mkdir()
    Policy([Operation(1, "vision", t) for t in ("q", "kv", "mlp")]).to_yaml(pdir / "ratio_0.5.yaml")
    stage.run(_cfg(root, model_dir, data, policy=str(pdir), run="run2"))
    (pr,) = ResultsStore(root / "results").records(method="dop")
    assert (pr.budget_kind, pr.budget_value) == ("ratio", 0.5) and pr.policy_hash
    if rec.tflops is not None:
        assert pr.tflops < rec.tflops
    # a second identical job skips the cells already in the store
    again = stage.run(_cfg(root, model_dir, data, run="run3"))
    assert again["records"] == [] and len(ResultsStore(root / "results").records()) == 2


def test_failing_benchmark_keeps_the_others(env, monkeypatch):
    root, model_dir, data = env
    good = Benchmark(name="synthetic", tasks=("dop_synthetic",), metric="exact_match", limit=2,
                     dataset_path=str(data))
    bad = Benchmark(name="broken", tasks=("no_such_task_xyz",), metric="acc")
    monkeypatch.setattr(stage_config, "resolve_benchmarks", lambda spec, check=True: [bad, good])
    cfg = _cfg(root, model_dir, data, None, "run4", "results_fail")
    with pytest.raises(RuntimeError, match="1 benchmark"):
        stage.run(cfg)
    (rec,) = ResultsStore(root / "results_fail").records()
    assert rec.benchmark == "synthetic"


def test_stage_runs_a_policy_with_a_front_end(env):
    """A policy with n_v runs through lmms-eval with its reducer: its record counts n_v visual tokens and
    its per-sample answers equal the VisPruner baseline's at the same knob (the same code path)."""
    pytest.importorskip("dop.engine")
    import json

    from dop.policy import Policy

    root, model_dir, data = env
    pdir = root / "nv_policies"
    pdir.mkdir()
    Policy(n_v=3).to_yaml(pdir / "tokens_3.yaml")
    out = stage.run(_cfg(root, model_dir, data, policy=str(pdir), run="run_nv"))
    (rec,) = [r for r in ResultsStore(root / "results").records(method="dop") if r.budget_kind == "tokens"]
    flops = rec.extra["per_sample_flops"]  # per sample: its own groups with 3 visual rows kept
    assert out["records"] and flops["n"] == 4 and rec.tflops == flops["mean_tflops"]
    assert flops["mean_equivalent_tokens"] == pytest.approx(3) and flops["max_share"] < 1
    stage.run(_cfg(root, model_dir, data, None, "run_vp", "results", "method=vispruner",
                   "method.important_ratio=0.5", "budget=tokens", "budget.values=[3]"))

    def responses(run: str) -> list:
        return [json.loads(line) for f in sorted((root / run / "samples").rglob("*.jsonl"))
                for line in f.read_text().splitlines()]

    assert len(responses("run_nv")) == 4 and responses("run_nv") == responses("run_vp")


@pytest.mark.slow  # 26 lmms-eval runs: ~3 min on a quiet 2-core machine
def test_stage_evaluates_the_13_benchmarks_on_local_copies_dense_and_pruned(env, tmp_path):
    """`dop stage=evaluate benchmark=paper13 benchmark.dataset_path=<copies> benchmark.judge=false`, dense
    and under a policy: lmms-eval's own task code for every benchmark, each headline metric in the store."""
    from dop.evaluation.benchmarks import resolve
    from dop.evaluation.fixtures import build_fixture
    from dop.ops import Operation
    from dop.policy import Policy

    root, model_dir, _ = env
    copies = tmp_path / "copies"
    members = resolve("paper13", check=False)
    for bench in members:
        build_fixture(bench.tasks[0], copies / bench.name, size=12 if bench.name == "mme" else 4)  # MME: both halves
    pdir = tmp_path / "policies"
    pdir.mkdir()
    Policy([Operation(1, "vision", t) for t in ("q", "kv", "mlp")]).to_yaml(pdir / "ratio_0.6.yaml")
    results = tmp_path / "results"
    for policy, run in ((None, "dense"), (pdir, "pruned")):
        out = stage.run(compose_cfg(tmp_path / run, "stage=evaluate", "device=cpu", "model.name=tiny_test",
                                    f"model.pretrained={model_dir}", "model.dtype=null", "benchmark=paper13",
                                    f"benchmark.dataset_path={copies}", "benchmark.judge=false",
                                    "benchmark.batch_size=4", f"paths.results_dir={results}",
                                    f"policy={policy}" if policy else "policy=null", output_dir=tmp_path / "out"))
        assert out["failures"] == []
    store = ResultsStore(results)
    for bench in members:
        for method in ("dense", "dop"):
            recs = store.records(benchmark=bench.name, method=method, metric=bench.metric)
            assert len(recs) == 1 and recs[0].samples >= 4, (bench.name, method)
