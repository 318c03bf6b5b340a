"""Baselines through `dop stage=evaluate` and the lmms-eval plugin, with stand-in methods.

Records land with every sample's TFLOPs <= its own budget (knobs resolved per sample); simple_evaluate
under a method == dop's own scoring loop; bad input (unknown method, a budget unreachable on the
sample prompt, a model lacking what a method needs) fails first; samples unreachable during the run
are named; budget.match=nominal runs the published knob beside the matched one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from baseline_fixtures import StandInFastV, StandInFirstK, standins_registered  # noqa: E402
from evaluation_fixtures import save_synthetic, save_tiny_llava, synthetic_dataset, tiny_llava  # noqa: E402
from stage_configs import compose_cfg, with_nodes  # noqa: E402

from dop.engine.baselines import MethodError  # noqa: E402
from dop.evaluation import scoring  # noqa: E402
from dop.evaluation.per_sample import sample_shapes  # noqa: E402
from dop.evaluation.plugin import DopLMM  # noqa: E402
from dop.evaluation.tasks import TASK_NAME, write_task_dir  # noqa: E402
from dop.results import ResultsStore  # noqa: E402
from dop.stages import evaluate as stage  # noqa: E402
from dop.stages import report as report_stage  # noqa: E402
from dop.stages.config import DOP_METHODS, EvaluateStage, ReportStage, load  # noqa: E402
from dop.stages.schema import ConfigError  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _standins():
    with standins_registered():
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return root, save_tiny_llava(root / "model"), save_synthetic(root / "data", n=4)


def _cfg(root, model_dir, data, method, budget, run="run", results="results", policy=None):
    cfg = compose_cfg(root / run, "stage=evaluate", "device=cpu", "model.name=tiny_test",
                      f"model.pretrained={model_dir}", "model.dtype=null", "benchmark=synthetic",
                      "benchmark.limit=2", "benchmark.batch_size=2", f"benchmark.dataset_path={data}",
                      f"paths.results_dir={root / results}", f"policy={policy}" if policy else "policy=null",
                      output_dir=root / "out")
    if method == {"name": "dop"}:  # the shipped conf/method/dop.yaml (dense or policies)
        return with_nodes(cfg, budget=budget)
    return with_nodes(cfg, method=method, budget=budget)


def test_stage_records_each_budget_at_or_below_it(env):
    root, model_dir, data = env
    cfg = _cfg(root, model_dir, data, {"name": "standin_fastv", "layer": 1}, {"kind": "ratio", "values": [0.9, 0.75]})
    out = stage.run(cfg)
    recs = sorted(ResultsStore(root / "results").records(method="standin_fastv"), key=lambda r: -r.budget_value)
    assert [(r.budget_kind, r.budget_value) for r in recs] == [("ratio", 0.9), ("ratio", 0.75)]
    for r in recs:
        flops = r.extra["per_sample_flops"]
        assert flops["n"] == 2 and flops["over_budget"] == 0 and flops["unreachable"] == 0
        # every sample at most its own share; the record's TFLOPs the mean of the samples'
        assert flops["max_share"] <= r.budget_value + 1e-12 and r.tflops == flops["mean_tflops"]
        assert r.tflops <= r.extra["budget_tflops"] * (1 + 1e-12)
        assert r.extra["knob_name"] == "keep" and sum(flops["knobs"].values()) == 2
        assert all(isinstance(json.loads(k), int) for k in flops["knobs"])
        assert r.extra["paper_convention"] == "fastv" and 0 < r.extra["paper_tflops"] < r.tflops
        assert r.extra["hparams"] == {"layer": 1} and f"budget=ratio:{r.budget_value:g}" in r.extra["model_args"]
        assert r.extra["match"] == "flops"
        assert r.equivalent_tokens is not None and r.policy_hash and r.samples == 2
        lat = r.extra["prefill_latency"]
        assert r.prefill_latency_s > 0 and lat["n"] == 2 and lat["min"] <= r.prefill_latency_s <= lat["max"]
    assert recs[0].extra["per_sample_flops"]["mean_share"] > recs[1].extra["per_sample_flops"]["mean_share"]
    assert len(out["records"]) == 2
    assert (root / "run" / "samples" / "standin_fastv_ratio_0.9" / "dop_synthetic.jsonl").is_file()
    # rerun: the cells are in the store
    assert stage.run(cfg)["records"] == []


def test_samples_unreachable_during_the_run_are_named(env):
    root, model_dir, data = env
    # reachable on the sample prompt, but not on every synthetic question (longer instructions)
    cfg = _cfg(root, model_dir, data, {"name": "standin_fastv", "layer": 1}, {"kind": "ratio", "values": [0.7]},
               run="run_unreach", results="results_unreach")
    with pytest.raises(RuntimeError, match=r"synthetic \(standin_fastv at ratio=0.7\): 1 of 2 samples unreachable"):
        stage.run(cfg)
    (r,) = ResultsStore(root / "results_unreach").records()
    assert r.extra["per_sample_flops"]["unreachable"] == 1 and r.extra["per_sample_flops"]["max_share"] > 0.7


def test_nominal_rows_beside_the_matched_ones(env):
    root, model_dir, data = env
    cfg = _cfg(root, model_dir, data, {"name": "standin_firstk"}, {"kind": "tokens", "values": [8], "match": "both"},
               run="run_both", results="results_both")
    stage.run(cfg)
    recs = {r.extra["match"]: r for r in ResultsStore(root / "results_both").records()}
    assert set(recs) == {"flops", "nominal"} and recs["flops"].policy_hash != recs["nominal"].policy_hash
    assert recs["nominal"].extra["knob"] == 8  # the published knob: keep 8 of 16 tokens
    assert recs["flops"].extra["knob"] == 8 and recs["flops"].tflops == pytest.approx(recs["nominal"].tflops)
    paths = report_stage.execute(load(ReportStage, compose_cfg(root / "report_both",
                                                               f"paths.results_dir={root / 'results_both'}")))
    md = Path(paths["markdown"]).read_text()
    assert "standin_firstk (nominal)" in md and "| standin_firstk |" in md


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

    paths = report_stage.execute(load(ReportStage, compose_cfg(root / "report", f"paths.results_dir={root / 'results_pre'}")))
    md = Path(paths["markdown"]).read_text()
    assert "standin_firstk" in md and "tokens=8" in md and "tokens=4" in md and "dense" in md
    assert "Knob" in md and "MFLOPs" in md and "of dense" in md  # the tiny model's FLOPs read in MFLOPs
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
    with pytest.raises(ConfigError, match=r"valid methods: .*standin_fastv"):
        stage.run(_cfg(root, model_dir, data, {"name": "fastvv"}, {"kind": "tokens", "values": [8]}))
    with pytest.raises(MethodError, match=r"nearest reachable budget is budget=tokens budget.values=\[\d+\]"):
        stage.run(_cfg(root, model_dir, data, {"name": "standin_fastv", "layer": 1},
                       {"kind": "tokens", "values": [1]}, results="results_bad"))
    with pytest.raises(ValueError, match="not a policy"):
        stage.run(_cfg(root, model_dir, data, {"name": "standin_fastv"}, {"kind": "tokens", "values": [8]},
                       policy="some.yaml"))
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
    assert lm.knob is None and lm.resolver.matcher.budget.value == 8  # the knob is resolved per sample
    image = synthetic_dataset(n=1)["test"][0]["image"]
    (shape,) = sample_shapes(lm.model, lm.processor, [[image]], [scoring.build_prompt(lm.processor, "what ?")])
    assert lm.resolver.resolve(shape).knob == 8
    with pytest.raises(ValueError, match="valid methods: dense, policy, .*standin_fastv"):
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


def _bench_cfg(run_dir, *overrides):
    shape = [f"bench.{k}={v}" for k, v in SMALL_SLICE.items()]
    return compose_cfg(run_dir, "stage=bench", "device=cpu", "bench.repeats=1", "bench.budget=tokens:8",
                       "budget=ratio", "budget.values=[0.5]", *shape, *overrides)


def test_bench_stage_matches_each_method_to_one_budget(tmp_path, capsys):
    import json

    from dop.stages.bench import run

    cfg = _bench_cfg(tmp_path, "bench.methods=[standin_fastv,standin_firstk]")
    rows = run(cfg)
    by = {r.policy: r for r in rows}
    assert by["standin_firstk"].knob == 8 and "stock" in by and "vision_from_0" in by
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert {r["policy"] for r in saved} == set(by)
    assert "baselines at tokens=8" in (tmp_path / "bench.md").read_text()
    with pytest.raises(MethodError, match="valid methods"):
        run(_bench_cfg(tmp_path, "bench.methods=[nope]"))


def test_bench_stage_times_text_guided_methods_with_a_clip_shaped_text_tower(tmp_path):
    """TRIM and CDPruner on the slice: a random CLIP-L-shaped text tower encodes the question, so they
    are timed (not skipped) and keep k visual tokens like the other reducers."""
    from dop.stages.bench import run

    by = {r.policy: r for r in run(_bench_cfg(tmp_path, "bench.methods=[trim,cdpruner,fastervlm]"))}
    assert {"trim", "cdpruner", "fastervlm"} <= set(by)
    assert by["trim"].knob == by["cdpruner"].knob == by["fastervlm"].knob == 8
    assert by["trim"].flops_reduction == pytest.approx(by["fastervlm"].flops_reduction)
    assert "skipped" not in (tmp_path / "bench.md").read_text()


def _method_configs() -> list[str]:
    from dop.stages import CONF_DIR

    return sorted(p.stem for p in Path(CONF_DIR, "method").glob("*.yaml") if p.stem not in DOP_METHODS)


@pytest.mark.parametrize("name", _method_configs())
def test_method_config_composes_for_evaluate_and_builds(name, tmp_path):
    from hydra import compose, initialize_config_dir

    from dop.stages import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["stage=evaluate", f"method={name}", "budget=tokens",
                                           "budget.values=[64]", f"paths.run_dir={tmp_path}"])
    assert cfg.budget.kind == "tokens" and list(cfg.budget["values"]) == [64]
    conf = load(EvaluateStage, cfg)
    method = stage.baseline_of(conf)  # the yaml's keys are the method's hyper-parameters
    assert method is not None and method.name == cfg.method.name


@pytest.mark.skipif("fastv" not in _method_configs(), reason="conf/method/fastv.yaml not landed yet")
def test_cli_evaluate_fastv_at_a_token_budget(env, tmp_path):
    """`dop stage=evaluate method=fastv budget=tokens budget.values=[12]` composes and runs."""
    from hydra import compose, initialize_config_dir

    from dop.models import resolve_path
    from dop.stages import CONF_DIR

    root, model_dir, data = env
    try:
        model_over = ["model=tiny_llava"] if Path(resolve_path("tiny_llava")).is_dir() else []
    except Exception:
        model_over = []
    model_over = model_over or [f"model.pretrained={model_dir}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["stage=evaluate", "method=fastv", "budget=tokens", "budget.values=[12]",
                                           "logger=none", "benchmark.limit=2", "benchmark.batch_size=2",
                                           f"benchmark.dataset_path={data}", f"paths.run_dir={tmp_path / 'run'}",
                                           f"paths.results_dir={tmp_path / 'results'}", *model_over])
    stage.run(cfg)
    (rec,) = ResultsStore(tmp_path / "results").records()
    assert rec.method == "fastv" and rec.budget_kind == "tokens" and rec.budget_value == 12
    assert rec.tflops <= rec.extra["budget_tflops"] and rec.extra["paper_convention"] == "fastv"
