"""The paper's 13 benchmarks through lmms-eval's own task code, offline, on local fixtures (issue 17).

Each benchmark's fixture (``dop.evaluation.fixtures``) is written in the task's schema, a task
derived from lmms-eval's original YAML is pointed at it (``dop.evaluation.local_tasks``), and
``simple_evaluate`` runs it through the ``dop`` plugin with the embedded model. Scores are not
asserted here: the embedded model was not trained on these prompts (issue 17, item 3).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager
from lmms_eval.utils import load_yaml_config

from dop.evaluation.benchmarks import BENCHMARK_DIR, BenchmarkError, resolve
from dop.evaluation.fixtures import TASKS, build_fixture, doc, text_image
from dop.evaluation.fixtures import main as fixtures_main
from dop.evaluation.local_tasks import (
    LocalDatasetError,
    benchmark_tasks,
    task_info,
    write_local_task,
)
from dop.evaluation.local_tasks import main as local_tasks_main
from dop.evaluation.plugin import MODEL_NAME, DopLMM
from dop.evaluation.scoring import build_prompt
from dop.flops import num_layers
from dop.models import load_model
from dop.ops import VISION
from dop.policy import DepthPolicy

# The keys a derived task may change: where the data comes from, its name, and (GQA) the image join
# that lmms-eval's process_docs would download, (MMBench, judge off) the judged aggregation.
DATASET_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs"}


@pytest.fixture(scope="module")
def model_proc():
    return load_model("tiny_llava")


@pytest.fixture(scope="module")
def lm(model_proc):
    model, proc = model_proc
    return DopLMM.from_model(model, proc, batch_size=4)


def evaluate(lm: DopLMM, task_dir: Path, tasks: list[str], **kwargs: Any) -> dict[str, Any]:
    tm = TaskManager("WARNING", include_path=str(task_dir), include_defaults=False, model_name=MODEL_NAME)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=True, verbosity="WARNING",
                           bootstrap_iters=0, **kwargs)


# --- each benchmark end to end ---------------------------------------------------------------------
@pytest.mark.parametrize("name", TASKS)
def test_benchmark_runs_lmms_eval_task_code_on_its_fixture(name, lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # some aggregations write submission files into the working directory
    fx = build_fixture(name, tmp_path / "data")
    (bench,) = resolve(name, check=False)
    bench = dataclasses.replace(bench, dataset_path=str(fx.path), judge=False)
    bench.check_runnable(env={})  # no API key needed once the judge is off
    names = benchmark_tasks(bench, tmp_path / "tasks")
    assert names == (f"dop_local_{name}" + ("_static" if name.startswith("mmbench") else ""),)
    res = evaluate(lm, tmp_path / "tasks", list(names))
    (task,) = names
    assert res["n-samples"][task]["effective"] == fx.size
    assert len(res["samples"][task]) == fx.size
    values = bench.metric_values(res["results"], task_names=names)
    assert bench.metric in values, (bench.metric, res["results"][task])
    # every document reached the plugin with the prompt lmms-eval's own doc_to_text makes of it
    contexts = [s["arguments"][0] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]
    contexts = [c[0] if isinstance(c, list) else c for c in contexts]
    assert contexts == _original_prompts(name, fx.path)
    if name in ANSWERABLE:  # the embedded model answers through the task's own prompt and parser
        assert values[bench.metric] / ANSWERABLE[name] >= 0.8, (name, values[bench.metric])


# Benchmarks whose fixtures the embedded model can answer, by answer format (value = the metric's full
# scale): short answer, yes/no, multiple-choice letters. Not here: MME (its total's scale depends on the
# categories a fixture holds) and OCRBench (the text drawn into a 32-pixel image is below the tiny
# tower's resolution).
SHORT = {"gqa": 1, "vqav2_val": 1, "textvqa_val": 1, "vizwiz_vqa_val": 1, "ok_vqa_val2014": 1}
YES_NO = {"pope": 1}
CHOICE = {"scienceqa_img": 1, "seedbench": 1, "mmmu_val": 1, "mmbench_en_dev": 100, "mmbench_cn_dev": 100}
ANSWERABLE = {**SHORT, **YES_NO, **CHOICE}


@pytest.mark.parametrize("name", ["gqa", "pope", "scienceqa_img"])  # one per answer format
def test_vision_pruned_from_layer_0_falls_to_near_chance(name, model_proc, tmp_path, monkeypatch):
    """Without its image the model guesses: every vision operation skipped from layer 0 on."""
    monkeypatch.chdir(tmp_path)
    model, proc = model_proc
    blind = DepthPolicy({("attn", VISION): 0, ("mlp", VISION): 0}).expand(num_layers(model))
    lm = DopLMM.from_model(model, proc, policy=blind, batch_size=4)
    fx = build_fixture(name, tmp_path / "data")
    (bench,) = resolve(name, check=False)
    bench = dataclasses.replace(bench, dataset_path=str(fx.path), judge=False)
    names = benchmark_tasks(bench, tmp_path / "tasks")
    score = bench.metric_values(evaluate(lm, tmp_path / "tasks", list(names))["results"], task_names=names)
    assert score[bench.metric] / ANSWERABLE[name] <= 0.5, (name, score)  # dense: >= 0.8 (above)


def _original_prompts(task: str, path: Path) -> list[str]:
    """lmms-eval's original ``doc_to_text`` (default prompt variant) on each fixture document."""
    info = task_info(task)
    config = load_yaml_config(str(info.yaml_path), mode="full")
    fn = config["doc_to_text"]
    kwargs = (config.get("lmms_eval_specific_kwargs") or {}).get("default")
    docs = datasets.load_from_disk(str(path / (info.dataset_name or "")))[str(info.split)]
    takes_kwargs = len(inspect.signature(fn).parameters) > 1
    return [fn(doc, kwargs) if takes_kwargs else fn(doc) for doc in docs]


def test_derived_task_is_the_original_but_for_its_dataset(tmp_path):
    """lmms-eval's own doc_to_visual/doc_to_text/process_results/aggregation/prompts/generation kwargs."""

    def plain(value: Any) -> Any:
        if callable(value):  # functions load from the same file twice; compare where they come from
            return (value.__code__.co_filename, value.__qualname__)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    for name in TASKS:
        fx = build_fixture(name, tmp_path / name)
        derived = write_local_task(name, tmp_path / "tasks", dataset_path=fx.path)
        new = plain(load_yaml_config(str(tmp_path / "tasks" / derived / f"{derived}.yaml"), mode="full"))
        old = plain(load_yaml_config(str(task_info(name).yaml_path), mode="full"))
        allowed = DATASET_KEYS | ({"process_docs"} if name == "gqa" else set())
        changed = {k for k in set(new) | set(old) if new.get(k) != old.get(k)}
        assert changed <= allowed, (name, changed - allowed)
        assert {"dataset_path", "task"} <= changed
        assert new["doc_to_text"][0] == old["doc_to_text"][0] and "lmms_eval/tasks" in new["doc_to_text"][0]


def test_multiple_choice_loglikelihood_task_on_the_seedbench_fixture(lm, tmp_path):
    """None of the 13 is a loglikelihood task (SEED-Bench is generate_until in lmms-eval 0.7.3);
    its seedbench_ppl variant is multiple_choice and reads the same dataset."""
    fx = build_fixture("seedbench", tmp_path / "data")
    name = write_local_task("seedbench_ppl", tmp_path / "tasks", dataset_path=fx.path)
    res = evaluate(lm, tmp_path / "tasks", [name])
    assert res["n-samples"][name]["effective"] == fx.size
    assert 0.0 <= res["results"][name]["acc,none"] <= 1.0
    sample = res["samples"][name][0]
    assert len(sample["resps"]) == 4  # one loglikelihood per option


@pytest.mark.parametrize("layout", ["parquet", "hub_cache"])
@pytest.mark.parametrize("name", ["gqa", "seedbench"])
def test_data_file_and_hub_cache_layouts(name, layout, lm, tmp_path, monkeypatch):
    """GQA (two configs in subfolders, joined on imageId) and SEED-Bench (lists of images) from parquet."""
    monkeypatch.chdir(tmp_path)
    fx = build_fixture(name, tmp_path / "data", layout=layout)
    task = write_local_task(name, tmp_path / "tasks", dataset_path=fx.path, judge=False)
    yaml_text = (tmp_path / "tasks" / task / f"{task}.yaml").read_text()
    assert 'dataset_path: "parquet"' in yaml_text and str(tmp_path / "data") in yaml_text
    res = evaluate(lm, tmp_path / "tasks", [task], limit=4)
    assert res["n-samples"][task]["effective"] == 4


def test_group_task_derives_each_member(lm, tmp_path):
    """pope_full is a group (pope_adv, pope_pop, pope_random: three splits of one dataset)."""
    fx = build_fixture("pope", tmp_path / "fixture")
    test = datasets.load_from_disk(str(fx.path))["test"]
    datasets.DatasetDict({s: test for s in ("adversarial", "popular", "random")}).save_to_disk(str(tmp_path / "full"))
    name = write_local_task("pope_full", tmp_path / "tasks", dataset_path=tmp_path / "full")
    res = evaluate(lm, tmp_path / "tasks", [name], limit=2)
    assert {f"dop_local_{m}" for m in ("pope_adv", "pope_pop", "pope_random")} <= set(res["results"])


# --- missing or wrong local copies ------------------------------------------------------------------
def test_missing_local_copy_is_one_line_naming_benchmark_and_layout(tmp_path):
    with pytest.raises(LocalDatasetError) as e:
        write_local_task("pope", tmp_path / "tasks", dataset_path=tmp_path / "nowhere")
    msg = str(e.value)
    assert "\n" not in msg and "'pope'" in msg and "split 'test'" in msg and "question_id" in msg
    assert "save_to_disk" in msg and "test-*.parquet" in msg and "lmms-lab-encoder/POPE" in msg


def test_wrong_split_missing_column_and_missing_gqa_images_are_named(tmp_path):
    fx = build_fixture("pope", tmp_path / "pope")
    test = datasets.load_from_disk(str(fx.path))["test"]
    datasets.DatasetDict({"train": test}).save_to_disk(str(tmp_path / "train_only"))
    with pytest.raises(LocalDatasetError, match=r"has splits \['train'\]"):
        write_local_task("pope", tmp_path / "tasks", dataset_path=tmp_path / "train_only")
    datasets.DatasetDict({"test": test.remove_columns("question_id")}).save_to_disk(str(tmp_path / "no_qid"))
    with pytest.raises(LocalDatasetError, match="lacks column.*question_id"):
        write_local_task("pope", tmp_path / "tasks", dataset_path=tmp_path / "no_qid")
    gqa = build_fixture("gqa", tmp_path / "gqa")
    images = gqa.path / "testdev_balanced_images"
    images.rename(tmp_path / "elsewhere")
    with pytest.raises(LocalDatasetError, match="testdev_balanced_images"):
        write_local_task("gqa", tmp_path / "tasks", dataset_path=gqa.path)


def test_unknown_task_and_unknown_fixture():
    with pytest.raises(BenchmarkError, match="no task or group 'no_such_task'"):
        write_local_task("no_such_task", "unused", dataset_path="unused")
    with pytest.raises(ValueError, match="no fixture for task 'pope_adv'"):
        build_fixture("pope_adv", "unused")


# --- the GPT judge switch ---------------------------------------------------------------------------
def test_judge_needs_its_key_unless_turned_off(tmp_path):
    for name in ("mmbench_en_dev", "mmbench_cn_dev"):
        with pytest.raises(BenchmarkError, match="OPENAI_API_KEY.*benchmark.judge=false"):
            resolve(name, env={})
        (bench,) = resolve({**_raw(name), "judge": False}, env={})
        assert not bench.judge
        (task,) = benchmark_tasks(bench, tmp_path)  # the hub dataset, scored without the judge
        assert task == f"dop_{name}_static"
        text = (tmp_path / task / f"{task}.yaml").read_text()
        assert "mmbench_static_score" in text and "dataset_path" not in text.split("include")[1]
    (pope,) = resolve("pope", env={})
    assert benchmark_tasks(pope, tmp_path) == ("pope",)  # nothing to change: the original task


def test_judged_mmbench_can_write_its_submission_file(tmp_path, monkeypatch):
    """With the judge on, MMBench's original metric list also aggregates `submission` into an .xlsx
    (pandas -> openpyxl, in dop's eval extra): without it the whole evaluation fails at the end."""
    monkeypatch.chdir(tmp_path)
    config = load_yaml_config(str(task_info("mmbench_en_dev").yaml_path), mode="full")
    (submission,) = [m["aggregation"] for m in config["metric_list"] if m["metric"] == "submission"]
    submission([{"index": 0, "question": "q", "answer": "A", "prediction": "A", "A": "red", "B": "blue"}], None)
    assert list(tmp_path.rglob("*.xlsx"))


def _raw(name: str) -> dict[str, Any]:
    return yaml.safe_load((BENCHMARK_DIR / f"{name}.yaml").read_text())


def test_suite_dataset_path_and_judge_reach_every_member(tmp_path):
    members = resolve({**_raw("paper13"), "dataset_path": str(tmp_path), "judge": False}, env={})
    assert [b.name for b in members] == list(TASKS)
    assert all(b.dataset_path == str(tmp_path / b.name) and not b.judge for b in members)
    assert all(b.dataset_path is None for b in resolve("paper13", check=False))
    (synthetic,) = resolve("synthetic", check=False)  # dop's own task reads its dataset_path itself
    assert synthetic.dataset_path and benchmark_tasks(synthetic, tmp_path) == ("dop_synthetic",)


# --- fixtures and plugin details --------------------------------------------------------------------
def test_fixtures_are_deterministic(tmp_path):
    a = build_fixture("mmmu_val", tmp_path / "a")
    b = build_fixture("mmmu_val", tmp_path / "b")
    c = build_fixture("mmmu_val", tmp_path / "c", seed=1)
    rows = [datasets.load_from_disk(str(f.path))["validation"].with_format("arrow")[:] for f in (a, b, c)]
    assert rows[0].equals(rows[1]) and not rows[0].equals(rows[2])


def test_text_bands_are_cropped_away_by_the_embedded_processor(model_proc):
    """OCR fixtures write the word beside the scene: the embedded model sees exactly the scene."""
    _, proc = model_proc
    scene = doc(0, "textvqa_val", 0).images[0]
    with_text = text_image(scene, "bottom_right")
    assert with_text.size != scene.size
    a = proc.image_processor(images=[scene], return_tensors="pt")["pixel_values"]
    b = proc.image_processor(images=[with_text], return_tensors="pt")["pixel_values"]
    assert a.shape == b.shape and (a == b).all()


def test_prompt_keeps_the_tasks_line_breaks_and_drops_image_markers(model_proc):
    _, proc = model_proc
    prompt = build_prompt(proc, "<image>\nwhat colour ?\nA. red\nB. blue", num_images=2)
    assert "what colour ?\nA. red\nB. blue" in prompt
    assert prompt.count(proc.image_token) == 2


def test_plugin_survives_lmms_eval_clean(model_proc):
    """lmms-eval calls lm.clean() after each evaluation; the model must stay for the next benchmark."""
    model, proc = model_proc
    lm = DopLMM.from_model(model, proc)
    lm.clean()
    assert lm.model is model


# --- lmms-eval's own command line ---------------------------------------------------------------------
def test_lmms_eval_cli_runs_a_local_benchmark(tmp_path, capsys):
    # dop's two helpers in-process (their CLIs print the path / the task name), lmms-eval's CLI as a user runs it
    assert fixtures_main(["mme", str(tmp_path / "mme")]) == 0
    data = capsys.readouterr().out.strip()
    assert local_tasks_main(["mme", data, str(tmp_path / "tasks")]) == 0
    task = capsys.readouterr().out.strip()
    assert task == "dop_local_mme"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "dop", "--model_args", "pretrained=tiny_llava,batch_size=4",
           "--tasks", task, "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out"),
           "--verbosity", "WARNING"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = list((tmp_path / "out").rglob("*_results.json"))
    res = json.loads(results.read_text())
    assert res["n-samples"][task]["effective"] == len(datasets.load_from_disk(data)["test"]) == 12
    assert {"mme_perception_score,none", "mme_cognition_score,none"} <= set(res["results"][task])


def test_local_tasks_cli_reports_a_missing_copy_in_one_line(tmp_path, capsys):
    assert local_tasks_main(["pope", str(tmp_path / "nowhere"), str(tmp_path / "tasks")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("LocalDatasetError: benchmark 'pope'") and "\n" not in err
