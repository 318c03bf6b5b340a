"""Baselines through `dop stage=evaluate` and the lmms-eval plugin, with stand-in methods.

Records land with TFLOPs <= budget; simple_evaluate under a method == dop's own scoring loop;
bad input (unknown method, unreachable budget, a model lacking what a method needs) fails first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytest.importorskip("lmms_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from baseline_fixtures import StandInFastV, StandInFirstK, standins_registered  # noqa: E402
from evaluation_fixtures import save_synthetic, save_tiny_llava, synthetic_dataset, tiny_llava  # noqa: E402

from dop.engine.baselines import MethodError  # noqa: E402
from dop.evaluation import scoring, stage  # noqa: E402
from dop.evaluation.plugin import DopLMM  # noqa: E402
from dop.evaluation.tasks import TASK_NAME, write_task_dir  # noqa: E402
from dop.results import ResultsStore  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _standins():
    with standins_registered():
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return root, save_tiny_llava(root / "model"), save_synthetic(root / "data", n=4)


def _cfg(root, model_dir, data, method, budget, run="run", results="results"):
    return OmegaConf.create({
        "stage": "evaluate", "seed": 0, "device": "cpu", "num_threads": None, "policy": None,
        "model": {"name": "tiny_test", "pretrained": str(model_dir), "dtype": None, "attn_implementation": "sdpa"},
        "method": method, "budget": budget,
        "benchmark": {"name": "synthetic", "tasks": ["dop_synthetic"], "metric": "exact_match",
                      "metrics": ["exact_match"], "limit": 2, "batch_size": 2, "dataset_path": str(data)},
        "paths": {"results_dir": str(root / results), "run_dir": str(root / run)},
        "logger": {"name": "none", "mode": "disabled", "project": "dop", "entity": None},
    })


def test_stage_records_each_budget_at_or_below_it(env):
    root, model_dir, data = env
    cfg = _cfg(root, model_dir, data, {"name": "standin_fastv", "layer": 1}, {"kind": "ratio", "values": [0.9, 0.7]})
    out = stage.run(cfg)
    recs = sorted(ResultsStore(root / "results").records(method="standin_fastv"), key=lambda r: -r.budget_value)
    assert [(r.budget_kind, r.budget_value) for r in recs] == [("ratio", 0.9), ("ratio", 0.7)]
    for r in recs:
        assert r.tflops * 1e12 <= r.extra["budget_tflops"] * 1e12 * (1 + 1e-12)
        assert r.extra["knob_name"] == "keep" and isinstance(r.extra["knob"], int)
        assert r.extra["paper_convention"] == "fastv" and 0 < r.extra["paper_tflops"] < r.tflops
        assert r.extra["hparams"] == {"layer": 1} and f"knob={r.extra['knob']}" in r.extra["model_args"]
        assert r.equivalent_tokens is not None and r.policy_hash and r.samples == 2
        assert r.prefill_latency_s > 0
    assert recs[0].extra["knob"] > recs[1].extra["knob"] and len(out["records"]) == 2
    assert (root / "run" / "samples" / "standin_fastv_ratio_0.9" / "dop_synthetic.jsonl").is_file()
    # rerun: the cells are in the store
    assert stage.run(cfg)["records"] == []


def test_stage_pre_llm_method_at_token_budgets_then_report(env):
    root, model_dir, data = env
    cfg = _cfg(root, model_dir, data, {"name": "standin_firstk"}, {"kind": "tokens", "values": [8, 4]},
               run="run_pre", results="results_pre")
    stage.run(cfg)
    stage.run(_cfg(root, model_dir, data, {"name": "dop"}, {"kind": "tokens", "values": [8]},
                   run="run_dense", results="results_pre"))  # dense beside it, for the report
    recs = ResultsStore(root / "results_pre").records(method="standin_firstk")
    assert sorted(r.extra["knob"] for r in recs) == [4, 8]  # one-shot keep-k meets a token budget exactly
    for r in recs:
        assert r.equivalent_tokens == pytest.approx(r.budget_value)

    from dop.report import run as report

    paths = report(OmegaConf.create({"paths": {"results_dir": str(root / "results_pre"),
                                               "run_dir": str(root / "report")}}))
    md = Path(paths["markdown"]).read_text()
    assert "standin_firstk" in md and "tokens=8" in md and "tokens=4" in md and "dense" in md
    assert "Knob" in md and "TFLOPs" in md
    assert Path(paths["plot"]).stat().st_size > 0


def test_check_model_runs_before_any_evaluation(env, monkeypatch):
    root, model_dir, data = env
    monkeypatch.setattr(stage, "evaluate_benchmark", lambda *a, **k: pytest.fail("evaluated before check_model"))
    cfg = _cfg(root, model_dir, data, {"name": "standin_text_tower"}, {"kind": "tokens", "values": [8]},
               results="results_bad")
    with pytest.raises(MethodError, match="needs a CLIP text tower"):
        stage.run(cfg)


def test_unknown_method_and_unreachable_budget_fail_first(env, monkeypatch):
    root, model_dir, data = env
    monkeypatch.setattr(stage, "evaluate_benchmark", lambda *a, **k: pytest.fail("evaluated a bad config"))
    with pytest.raises(MethodError, match=r"known methods: .*standin_fastv"):
        stage.run(_cfg(root, model_dir, data, {"name": "fastvv"}, {"kind": "tokens", "values": [8]}))
    with pytest.raises(MethodError, match=r"nearest reachable budget is budget=tokens budget.values=\[\d+\]"):
        stage.run(_cfg(root, model_dir, data, {"name": "standin_fastv", "layer": 1},
                       {"kind": "tokens", "values": [1]}, results="results_bad"))
    with pytest.raises(ValueError, match="not a policy"):
        cfg = _cfg(root, model_dir, data, {"name": "standin_fastv"}, {"kind": "tokens", "values": [8]})
        cfg.policy = "some.yaml"
        stage.run(cfg)
    assert not (root / "results_bad").exists() or not list((root / "results_bad").glob("*.json"))


def test_an_unreachable_budget_does_not_lose_the_reachable_ones(env):
    root, model_dir, data = env
    with pytest.raises(RuntimeError, match=r"nearest reachable budget is budget=tokens budget.values=\[\d+\]"):
        stage.run(_cfg(root, model_dir, data, {"name": "standin_fastv", "layer": 1},
                       {"kind": "tokens", "values": [16, 1]}, results="results_mixed"))
    records = ResultsStore(root / "results_mixed").records()
    assert records and {r.budget_value for r in records} == {16.0}


@pytest.fixture(scope="module")
def task_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic_dataset(n=6).save_to_disk(str(root / "data"))
    return root / "data", write_task_dir(root / "data", root / "tasks")


@pytest.mark.parametrize("method,knob", [(StandInFastV(layer=1), 4), (StandInFirstK(), 4)], ids=["in_llm", "pre_llm"])
def test_simple_evaluate_equals_direct_loop_under_a_method(task_env, method, knob):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    model, proc = tiny_llava()
    data, tasks = task_env
    dense = scoring.score_synthetic(model, proc, data, batch_size=3)
    direct = scoring.score_synthetic(model, proc, data, method=method, knob=knob, batch_size=3)
    assert direct["predictions"] != dense["predictions"]  # the method changes the answers
    lm = DopLMM.from_model(model, proc, method=method, knob=knob, batch_size=3)
    res = simple_evaluate(model=lm, tasks=[TASK_NAME], task_manager=TaskManager("WARNING", include_path=str(tasks),
                          model_name="dop"), log_samples=True, verbosity="WARNING", bootstrap_iters=0)
    assert res["results"][TASK_NAME]["exact_match,none"] == pytest.approx(direct["accuracy"], abs=0)
    assert [s["filtered_resps"][0] for s in res["samples"][TASK_NAME]] == direct["predictions"]


def test_plugin_model_args_select_a_baseline(env):
    root, model_dir, _ = env
    lm = DopLMM.create_from_arg_string(f"pretrained={model_dir},method=standin_firstk,knob=4")
    assert lm.method == "standin_firstk" and lm.knob == 4 and isinstance(lm.baseline, StandInFirstK)
    lm = DopLMM.create_from_arg_string(f"pretrained={model_dir},method=standin_firstk,budget=tokens:8")
    assert lm.knob == 8 and lm.match.tflops > 0
    with pytest.raises(ValueError, match="known methods: dense, policy, .*standin_fastv"):
        DopLMM.create_from_arg_string(f"pretrained={model_dir},method=nope")
    with pytest.raises(ValueError, match="exactly one of knob"):
        DopLMM.create_from_arg_string(f"pretrained={model_dir},method=standin_firstk")
    with pytest.raises(ValueError, match="for baseline methods"):
        DopLMM.create_from_arg_string(f"pretrained={model_dir},knob=4")


SMALL_SLICE = dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=4,
                   n_system=5, n_vision=16, n_instruction=6)


def test_bench_times_methods_next_to_their_flops():
    from dop.bench import build_slice, format_rows, run_bench

    model, inputs, groups = build_slice(**SMALL_SLICE)
    skipped: dict[str, str] = {}
    rows = run_bench(model, inputs, groups, policies={"stock": None}, repeats=1, warmup=0, skipped=skipped,
                     methods={"standin_fastv": (StandInFastV(layer=1), 4), "standin_firstk": (StandInFirstK(), 4),
                              "broken": (StandInFirstK(), "not-a-knob")})
    by = {r.policy: r for r in rows}
    assert set(by) == {"stock", "standin_fastv", "standin_firstk"} and "broken" in skipped
    assert 0 < by["standin_fastv"].flops_reduction < by["standin_firstk"].flops_reduction < 1
    assert by["standin_firstk"].knob == 4 and by["standin_firstk"].latency_s > 0
    assert "standin_firstk (knob 4)" in format_rows(rows)


def test_bench_stage_matches_each_method_to_one_budget(tmp_path, capsys):
    import json

    from dop.bench import run

    cfg = OmegaConf.create({"bench": {**SMALL_SLICE, "repeats": 1, "dtype": "float32", "device": "cpu",
                                      "methods": ["standin_fastv", "standin_firstk"], "budget": "tokens:8"},
                            "budget": {"kind": "ratio", "values": [0.5]}, "paths": {"run_dir": str(tmp_path)}})
    rows = run(cfg)
    by = {r.policy: r for r in rows}
    assert by["standin_firstk"].knob == 8 and "stock" in by and "vision_from_0" in by
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert {r["policy"] for r in saved} == set(by)
    assert "baselines at tokens=8" in (tmp_path / "bench.md").read_text()
    cfg.bench.methods = ["nope"]
    with pytest.raises(MethodError, match="known methods"):
        run(cfg)


def test_bench_stage_times_text_guided_methods_with_a_clip_shaped_text_tower(tmp_path):
    """TRIM and CDPruner on the slice: a random CLIP-L-shaped text tower encodes the question, so they
    are timed (not skipped) and keep k visual tokens like the other reducers."""
    from dop.bench import run

    cfg = OmegaConf.create({"bench": {**SMALL_SLICE, "repeats": 1, "dtype": "float32", "device": "cpu",
                                      "methods": ["trim", "cdpruner", "fastervlm"], "budget": "tokens:8"},
                            "budget": {"kind": "ratio", "values": [0.5]}, "paths": {"run_dir": str(tmp_path)}})
    by = {r.policy: r for r in run(cfg)}
    assert {"trim", "cdpruner", "fastervlm"} <= set(by)
    assert by["trim"].knob == by["cdpruner"].knob == by["fastervlm"].knob == 8
    assert by["trim"].flops_reduction == pytest.approx(by["fastervlm"].flops_reduction)
    assert "skipped" not in (tmp_path / "bench.md").read_text()


def _method_configs() -> list[str]:
    from dop.cli import CONF_DIR

    return sorted(p.stem for p in Path(CONF_DIR, "method").glob("*.yaml") if p.stem != "dop")


@pytest.mark.parametrize("name", _method_configs())
def test_method_config_composes_for_evaluate_and_builds(name, tmp_path):
    from hydra import compose, initialize_config_dir

    from dop.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["stage=evaluate", f"method={name}", "budget=tokens",
                                           "budget.values=[64]", f"paths.run_dir={tmp_path}"])
    assert cfg.budget.kind == "tokens" and list(cfg.budget["values"]) == [64]
    try:
        method = stage.baseline_of(cfg.method)  # the yaml's keys are the method's hyper-parameters
    except ImportError as err:
        pytest.skip(f"{name} does not import yet: {err}")
    assert method is not None and method.name == cfg.method.name


@pytest.mark.skipif("fastv" not in _method_configs(), reason="conf/method/fastv.yaml not landed yet")
def test_cli_evaluate_fastv_at_a_token_budget(env, tmp_path):
    """`dop stage=evaluate method=fastv budget=tokens budget.values=[64]` composes and runs."""
    from hydra import compose, initialize_config_dir

    from dop.cli import CONF_DIR
    from dop.models import resolve_path

    root, model_dir, data = env
    try:
        model_over = ["model=tiny_llava"] if Path(resolve_path("tiny_llava")).is_dir() else []
    except Exception:
        model_over = []
    model_over = model_over or [f"model.pretrained={model_dir}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["stage=evaluate", "method=fastv", "budget=tokens", "budget.values=[64]",
                                           "logger=none", "benchmark.limit=2", "benchmark.batch_size=2",
                                           f"benchmark.dataset_path={data}", f"paths.run_dir={tmp_path / 'run'}",
                                           f"paths.results_dir={tmp_path / 'results'}", *model_over])
    stage.run(cfg)
    (rec,) = ResultsStore(tmp_path / "results").records()
    assert rec.method == "fastv" and rec.budget_kind == "tokens" and rec.budget_value == 64
    assert rec.tflops <= rec.extra["budget_tflops"] and rec.extra["paper_convention"] == "fastv"
