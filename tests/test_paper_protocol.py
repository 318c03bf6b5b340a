"""The paper's protocol on real models (issue 15): each real model's main-table cell calibrates on a
named real calibration set with method=dop_paper; calibrating on a split a configured benchmark
evaluates is refused; one search per (model, calibration set, space, budgets) serves every benchmark
cell (the search store, dop.stages.store) and every rerun."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from stage_configs import stage_conf

import dop.stages.search as search_stage
import dop.stages.sweep as sweep_stage
from dop.adapters import get_adapter
from dop.cli import resolve_stage
from dop.divergence import calibration_batches
from dop.evaluation.benchmarks import resolve
from dop.evaluation.disjoint import OverlapError, check_disjoint
from dop.evaluation.fixtures import build_fixture
from dop.evaluation.scoring import group_sizes, sample_inputs
from dop.models import TINY_LLAVA_DIR, build_prompt, load_model
from dop.policy import DepthPolicy, Policy
from dop.results import ResultsStore
from dop.stages import CONF_DIR, store
from dop.stages import evaluate as evaluate_stage
from dop.stages.config import EvaluateStage, PipelineStage, SearchStage, load
from dop.stages.schema import ConfigError
from dop.sweep import SweepStore

REAL_MODELS = {"llava15_7b": "vispruner", "llava15_13b": "vispruner", "llava_next_7b": "vispruner",
               "qwen2vl_7b": "resize", "qwen25vl_7b": "resize", "internvl3_8b": "vispruner"}
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["paths.run_dir=/tmp/unused", "paths.output_dir=/tmp/unused_out",
                                            *overrides])


# --- every real model: a real calibration set, dop_paper with the family's front end -------------------------
@pytest.mark.parametrize("model", list(REAL_MODELS))
def test_main_table_cell_composes_with_real_calibration_and_dop_paper(model):
    conf = load(PipelineStage, _compose("experiment=main_table", f"model={model}"))
    assert conf.data.kind == "llava_json" and conf.data.name == "gqa_train"  # GQA train questions, not synthetic
    assert conf.data.image_prefix == "gqa/" and conf.data.json_file.endswith("llava_v1_5_mix665k.json")
    assert not conf.data.allow_overlap
    method = conf.method
    assert method.name == "dop_paper" and method.types == ["attn", "mlp"] and method.groups == ["vision"]
    assert method.reducer == conf.model.front_end == REAL_MODELS[model] and method.n_v
    assert conf.model.system_prompt == (VICUNA_SYSTEM if model.startswith("llava") else None)
    # the main table's search job (main_table_search) lands where every benchmark cell looks for it
    search = load(SearchStage, _compose("experiment=main_table_search", f"model={model}"))
    assert search.data == conf.data and search.method == conf.method
    assert store.location(search).search_dir == store.location(conf.search_stage("/tmp/unused")).search_dir
    other = conf.search_stage("/tmp/unused")
    cell = load(PipelineStage, _compose("experiment=main_table", f"model={model}", "benchmark=pope"))
    assert store.location(cell.search_stage("/tmp/x")).search_dir == store.location(other).search_dir
    # the model's default budgets are not part of the key (the budgets searched are)
    shifted = load(PipelineStage, _compose("experiment=main_table", f"model={model}", "model.budgets.values=[0.5]"))
    assert store.location(shifted.search_stage("/tmp/x")).search_dir == store.location(other).search_dir
    # another calibration set or space is another search
    space = load(PipelineStage, _compose("experiment=main_table", f"model={model}", "method.grid_step=4"))
    assert store.location(space.search_stage("/tmp/x")).search_dir != store.location(other).search_dir


def test_a_data_choice_replaces_the_model_default_and_tiny_keeps_synthetic():
    cfg = _compose("model=llava15_7b", "data=lmms_task", "data.task=gqa")
    assert cfg.data.name == "lmms_task" and cfg.data.split is None  # the task's non-evaluated split
    assert _compose("model=tiny_llava").data.name == "synthetic"
    assert _compose("experiment=main_table", "model=tiny_llava").data.name == "synthetic"


def test_the_search_job_can_be_held_by_the_table_on_slurm():
    """The second of the two documented commands: the table's array waits on the search jobs."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=main_table", "launcher=slurm", "hydra.launcher.partition=gpu",
                                           "++hydra.launcher.additional_parameters.dependency=afterok:123"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher.additional_parameters.dependency == "afterok:123"
    text = (Path(CONF_DIR) / "experiment" / "main_table.yaml").read_text()
    assert "experiment=main_table_search" in text and "dependency=afterok:<ID>" in text


# --- disjointness ---------------------------------------------------------------------------------------------
TINY_DATA = ["data.sizes.train=4", "data.sizes.val=4", "data.sizes.test=4", "method.num_calibration=2",
             "method.grid_step=3", "sweep.progress_bar=false", "num_threads=1", "device=cpu"]


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the calibration data was checked")


def test_search_on_the_evaluated_split_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_stage, "load_model", _no_model)
    data = tmp_path / "data"
    conf = stage_conf(SearchStage, tmp_path / "run", f"data.path={data}", "data.calibration_split=test",
                      "benchmark=synthetic", *TINY_DATA)
    with pytest.raises(ConfigError) as err:
        search_stage.execute(conf)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("data=synthetic: calibrating on ")
    assert f"{data.resolve()} split 'test'" in msg and "benchmark synthetic evaluates" in msg
    assert "data.allow_overlap=true" in msg
    # the explicit override lets it through (the check, not the search: that needs the model)
    allowed = stage_conf(SearchStage, tmp_path / "run", f"data.path={data}", "data.calibration_split=test",
                         "benchmark=synthetic", "data.allow_overlap=true", *TINY_DATA)
    search_stage.disjoint(allowed, sweep_stage.calibration_set(allowed).source)
    # the default calibration split (val) is another split of the same dataset: fine
    fine = stage_conf(SearchStage, tmp_path / "run", f"data.path={data}", "benchmark=synthetic", *TINY_DATA)
    search_stage.disjoint(fine, sweep_stage.calibration_set(fine).source)


def test_disk_copy_of_an_evaluated_split_and_the_hub_id_are_refused(tmp_path):
    fx = build_fixture("pope", tmp_path / "pope")
    (pope,) = resolve("pope", check=False)
    local = pope.__class__(**{**pope.__dict__, "dataset_path": str(fx.path)})
    conf = stage_conf(SearchStage, tmp_path / "run", "data=disk", f"data.path={fx.path}", "data.split=test",
                      "method.num_calibration=2")
    source = sweep_stage.calibration_set(conf).source
    with pytest.raises(OverlapError, match=r"data=disk: calibrating on .*pope.* split 'test', the split "
                                           r"benchmark pope evaluates"):
        check_disjoint(source, [local], "disk")
    check_disjoint(source, resolve("gqa", check=False), "disk")  # another benchmark's data: fine
    # the evaluated split named through the hub (an lmms-eval task's docs): lmms-lab/POPE test is POPE's
    with pytest.raises(OverlapError, match="benchmark pope"):
        check_disjoint({"kind": "lmms_eval", "task": "pope", "dataset": "lmms-lab/POPE", "config": None,
                        "split": "test"}, [pope])
    check_disjoint({"kind": "lmms_eval", "task": "x", "dataset": "lmms-lab/POPE", "config": None,
                    "split": "train"}, [pope])
    # GQA train questions from a LLaVA JSON against every benchmark of the paper: disjoint
    check_disjoint({"kind": "llava_json", "dataset": str(tmp_path / "mix.json"), "config": "gqa/", "split": None},
                   resolve("paper13", check=False))


def test_evaluating_a_policy_searched_on_the_evaluated_split_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_stage, "load_model", _no_model)
    data = (tmp_path / "data").resolve()
    policy = DepthPolicy({"kv/vision": 2}).expand(6)
    policy.meta = {"calibration": {"kind": "synthetic", "dataset": str(data), "config": None, "split": "test"}}
    path = tmp_path / "p.yaml"
    policy.to_yaml(path)
    assert Policy.from_yaml(path).meta["calibration"]["split"] == "test"
    conf = stage_conf(EvaluateStage, tmp_path / "run", f"data.path={data}", "benchmark=synthetic",
                      f"policy={path}", "method=dop_paper")
    with pytest.raises(ConfigError, match=r"calibrating on .* split 'test', the split benchmark synthetic evaluates"):
        evaluate_stage.execute(conf)


# --- one search for every benchmark cell ----------------------------------------------------------------------
needs_tiny = pytest.mark.skipif(not (TINY_LLAVA_DIR / "config.json").exists(), reason="tiny_llava not shipped")


@needs_tiny
def test_main_table_slice_runs_one_search_for_two_benchmark_cells(tmp_path, monkeypatch):
    """tiny_llava x dop_paper x {synthetic, POPE (a local fixture)}: one sweep (its point files written
    once), both cells evaluate the same policy files, and a rerun reuses the search."""
    builds = []
    real_build = search_stage.build_job
    monkeypatch.setattr(search_stage, "build_job", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    fx = build_fixture("pope", tmp_path / "pope", size=4)
    out = tmp_path / "out"
    common = ["experiment=main_table", "model=tiny_llava", "method=dop_paper", "budget.kind=ratio",
              "budget.values=[0.9,0.8]", "benchmark.limit=4", "benchmark.batch_size=4", "logger=none",
              f"paths.output_dir={out}", f"data.path={tmp_path / 'data'}", *TINY_DATA]
    cells = {"synthetic": ["benchmark=synthetic"], "pope": ["benchmark=pope", f"benchmark.dataset_path={fx.path}"]}

    def run(bench: str):
        run_dir = out / "experiments" / "main_table" / "tiny_llava" / "dop_paper" / bench
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[*common, *cells[bench], f"paths.run_dir={run_dir}"])
        assert cfg.stage == "pipeline"
        resolve_stage(str(cfg.stage))(cfg)
        return run_dir

    first = run("synthetic")
    (key_dir,) = (out / "searches" / "tiny_llava").glob("sweep-*")
    def point_files() -> dict[Path, int]:  # <pair>/<depth>.json and n_v_<reducer>/<n_v>.json
        return {p: p.stat().st_mtime_ns for p in (key_dir / "sweep").glob("*/*.json") if p.parent.name != "shards"}

    points = point_files()
    assert len(points) == len(SweepStore(key_dir / "sweep").points()) > 0
    assert {p.parent.name for p in points} == {"attn_vision", "mlp_vision", "n_v_vispruner"}
    second = run("pope")
    assert len(builds) == 1  # one sweep + search for both cells
    assert [p.name for p in (out / "searches" / "tiny_llava").glob("sweep-*")] == [key_dir.name]
    assert point_files() == points  # none added, none rewritten
    policies = (first / "policies").resolve()
    assert policies == (second / "policies").resolve() and policies.parent.parent == key_dir
    files = sorted(policies.glob("*.yaml"))
    assert [f.stem for f in files] == ["ratio_0.8", "ratio_0.9"]
    digests = {Policy.from_yaml(f).digest() for f in files}  # (on the tiny model both budgets may agree)
    records = ResultsStore(out / "results").records(method="dop_paper")
    by_bench = {b: {r.policy_hash for r in records if r.benchmark == b} for b in ("synthetic", "pope")}
    assert by_bench == {"synthetic": digests, "pope": digests}
    search = OmegaConf.load(second / "search.json")  # JSON is YAML
    cal = search.calibration
    assert cal.kind == "synthetic" and cal.split == "val" and cal.num_samples == 2 and len(cal.ids) == 2
    assert cal.group_sizes.vision > 0 and search.seed is not None
    # the cell's summary shows the search's predicted and measured KL on the dop_paper rows
    rows = [r for r in (second / "summary.md").read_text().splitlines() if r.startswith("| dop_paper |")]
    entry = search.budgets["ratio_0.8"]
    assert len(rows) == 2 and any(f"| {entry.predicted_kl:.3g} | {entry.measured_kl:.3g} |" in r for r in rows)
    run("synthetic")  # a rerun: the stored search, nothing recomputed
    assert len(builds) == 1


# --- the model's system prompt reaches calibration, evaluation and FLOPs ----------------------------------------
def _system_rows(processor, system: str | None) -> int:
    """Prompt tokens before the image (the adapter's system group), counted with the tokenizer."""
    prompt = build_prompt(processor, "what is it ?", system)
    tok = processor.tokenizer
    return len(tok(prompt[: prompt.index("<image>")].rstrip(), add_special_tokens=False)["input_ids"])


@needs_tiny
def test_system_prompt_in_calibration_evaluation_and_records(tmp_path):
    model, processor = load_model("tiny_llava")
    system = "a chat between a curious user and a helpful assistant ."
    own, given = _system_rows(processor, None), _system_rows(processor, system)
    assert given > own
    assert group_sizes(model, sample_inputs(model, processor)["input_ids"])["system"] == own
    assert group_sizes(model, sample_inputs(model, processor, system=system)["input_ids"])["system"] == given
    data = tmp_path / "data"
    conf = stage_conf(SearchStage, tmp_path / "run", f"data.path={data}", f"model.system_prompt='{system}'",
                      *TINY_DATA)
    samples = sweep_stage.calibration_set(conf).samples
    (batch,) = calibration_batches(processor, samples, 4, system=conf.model.system_prompt)
    masks = get_adapter(model).token_groups(batch.inputs["input_ids"], batch.inputs["attention_mask"])
    assert masks["system"].sum(1).tolist() == [given] * len(samples)  # left padding is in no group
    # the evaluate stage: the sample prompt (FLOPs) and every served prompt carry it, and the records say so
    cfg = stage_conf(EvaluateStage, tmp_path / "eval", f"data.path={data}", f"model.system_prompt='{system}'",
                     "benchmark=synthetic", "benchmark.limit=2", "benchmark.batch_size=2", "policy=null",
                     "method=dop_paper", *TINY_DATA[:3], "device=cpu", output_dir=tmp_path / "out")
    evaluate_stage.execute(cfg)
    (rec,) = ResultsStore(tmp_path / "out" / "results").records(method="dense")
    assert rec.extra["groups"]["system"] == given and rec.extra["measured_groups"]["system"] == given
    assert rec.extra["measured_groups"]["vision"] == rec.extra["groups"]["vision"]
