"""Bad input through the real CLI: every case exits non-zero with at most 3 lines on stderr, no traceback,
naming the config key or file and what is valid (issue 18). Most cases are refused before a run directory
is made or a model loads; the budget cases once the model's group sizes are known, before any sweep point."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import datasets
import pytest
from transformers.utils import logging as hf_logging

from dop import cli
from dop.models import TINY_LLAVA_DIR

needs_tiny = pytest.mark.skipif(not (TINY_LLAVA_DIR / "config.json").exists(), reason="tiny_llava not shipped")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.yaml").write_text("")
    (root / "garbage.yaml").write_text("pruned: [unclosed\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "no_policies").mkdir()
    (root / "a_file").write_text("not a directory")
    run = root / "corrupt_run"
    run.mkdir()
    (run / "pipeline.json").write_text("{not json")
    return root


# (id, command-line overrides, what stderr must name); {r} is the fixture folder
CASES = [
    ("stage", ["stage=nope"], "unknown stage 'nope'; valid stages: pipeline"),
    ("model option", ["model=nope"], "Could not find 'model/nope'"),
    ("budget option", ["budget=nope"], "Could not find 'budget/nope'"),
    ("method option", ["method=nope"], "Could not find 'method/nope'"),
    ("benchmark option", ["benchmark=nope"], "Could not find 'benchmark/nope'"),
    ("data option", ["data=nope"], "Could not find 'data/nope'"),
    ("unknown top-level key", ["+foo=1"], "foo is not a known config key"),
    ("dead data.num_calibration", ["data.num_calibration=0"], "data.num_calibration"),
    ("ratio budget 0", ["budget=ratio", "budget.values=[0]"], "ratio budget must be in (0, 1]"),
    ("ratio budget above 1", ["budget=ratio", "budget.values=[1.5]"], "ratio budget must be in (0, 1]"),
    ("negative TFLOPs", ["budget=tflops", "budget.values=[-1]"], "TFLOPs budget must be > 0"),
    ("negative tokens", ["budget=tokens", "budget.values=[-3]"], "equivalent-token budget must be >= 0"),
    ("budget not a number", ["budget=tokens", "budget.values=[lots]"], "budget.values[0]='lots'"),
    ("solver", ["method.solver=bogus"], "method.solver='bogus' is not valid; valid: exact, greedy"),
    ("interpolation", ["method.interpolation=cubic"], "method.interpolation='cubic' is not valid; valid: linear"),
    ("objective", ["method.objective=f1"], "method.objective='f1' is not valid; valid: kl, accuracy"),
    ("grid step", ["method.grid_step=0"], "method.grid_step=0"),
    ("calibration size", ["method.num_calibration=0"], "method.num_calibration=0"),
    ("additive check", ["method.check_additive=-1"], "method.check_additive=-1"),
    ("reuse mode", ["sweep.reuse=halfway"], "sweep.reuse='halfway' is not valid; valid: none, prefix, half_layer"),
    ("shard", ["stage=sweep", "sweep.shard=3", "sweep.num_shards=2"], "sweep.shard=3"),
    ("sweep batch", ["sweep.batch_size=0"], "sweep.batch_size=0"),
    ("device", ["device=tpu"], "device='tpu' is not valid; valid: auto, cpu, cuda, cuda:N"),
    ("threads", ["num_threads=0"], "num_threads=0"),
    ("logger mode", ["logger.mode=sometimes"], "logger.mode='sometimes' is not valid"),
    ("dtype", ["model.dtype=float8"], "model.dtype='float8' is not valid"),
    ("missing model path", ["model.pretrained=/nonexistent/dop/model"], "model.pretrained='/nonexistent/dop/model'"),
    ("missing policy", ["stage=evaluate", "policy=/nonexistent/p.yaml"], "policy file '/nonexistent/p.yaml' does not exist"),
    ("missing policy path with a colon", ["stage=evaluate", "policy='/nonexistent/run:1/p'"],
     "policy file '/nonexistent/run:1/p' does not exist"),
    ("empty policy", ["stage=evaluate", "policy={r}/empty.yaml"], "empty.yaml' is empty"),
    ("garbage policy", ["stage=evaluate", "policy={r}/garbage.yaml"], "garbage.yaml' is not valid YAML"),
    ("list policy", ["stage=evaluate", "policy={r}/list.yaml"], "list.yaml' must hold a mapping"),
    ("no policy files", ["stage=evaluate", "policy={r}/no_policies"], "no policy YAML in"),
    ("unknown baseline", ["stage=evaluate", "method=fastv", "method.name=fastvv"], "unknown method 'fastvv'"),
    ("baseline hyper-parameter", ["stage=evaluate", "method=fastv", "method.K=-1"], "K must be an int"),
    ("baseline with a policy", ["stage=evaluate", "method=fastv", "policy={r}/empty.yaml"], "is a baseline"),
    ("judged benchmark without key", ["stage=evaluate", "benchmark=mmbench_en_dev"], "OPENAI_API_KEY"),
    ("run dir under a file", ["hydra.run.dir={r}/a_file/run"], "run directory (hydra.run.dir)"),
    ("results store under a file", ["stage=evaluate", "paths.results_dir={r}/a_file/results"],
     "results store (paths.results_dir)"),
    ("corrupt pipeline.json", ["hydra.run.dir={r}/corrupt_run"], "pipeline.json is not readable JSON"),
    ("merge without stores", ["stage=merge", "sweep.merge_from=[{r}/no_policies]"], "is not a sweep store"),
    ("TFLOPs budget below any policy", ["stage=search", "budget=tflops", "budget.values=[1e-9]"],
     "below the cheapest sensible policy"),
    ("a 7B TFLOPs budget on the tiny model", ["stage=search", "budget=tflops", "budget.values=[4.29]"],
     "above tiny_llava's dense prefill"),
    ("tokens above the image", ["stage=search", "budget=tokens", "budget.values=[100]"],
     "more visual tokens than tiny_llava's images have"),
    ("disk data without a path", ["stage=search", "data=disk"], "data.path must be set"),
    ("empty synthetic split", ["stage=search", "data.sizes.val=0"], "data.sizes.val=0"),
]


COMMON = ["logger=none", "data.sizes.train=8", "data.sizes.val=64", "data.sizes.test=8"]
# run as real processes too (exit status and stderr of the `dop` process itself); the rest run the
# same entry point in-process, ~30x cheaper than a Python start-up with torch each
SUBPROCESS = {"stage", "missing model path", "corrupt pipeline.json", "TFLOPs budget below any policy"}


@pytest.fixture(scope="module", autouse=True)
def no_progress_bars():
    """What `dop` gets from TQDM_DISABLE set before tqdm loads (here tqdm was imported long before)."""
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    yield
    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()


def run_dop(argv: list[str], tmp_path: Path, monkeypatch, capfd, subprocess_run: bool) -> tuple[int, str]:
    """Exit status and stderr of ``dop <argv>`` (cwd ``tmp_path``, no debug environment)."""
    argv = [f"paths.output_dir={tmp_path / 'out'}", *COMMON, *argv]
    if subprocess_run:
        env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "OPENAI_API_KEY")}
        res = subprocess.run([sys.executable, "-m", "dop.cli", *argv], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=600)
        return res.returncode, res.stderr
    for var in ("HYDRA_FULL_ERROR", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dop", *argv])
    capfd.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # an escaped exception is what a user would see as a traceback
        traceback.print_exc()
        code = 1
    return code, capfd.readouterr().err


@needs_tiny
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, files, tmp_path, monkeypatch, capfd):
    name, overrides, named = case
    argv = [o.replace("{r}", str(files)) for o in overrides]
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={tmp_path / 'run'}")
    code, stderr = run_dop(argv, tmp_path, monkeypatch, capfd, subprocess_run=name in SUBPROCESS)
    err = stderr.strip().splitlines()
    assert code != 0
    assert "Traceback" not in stderr and len(err) <= 3, stderr
    assert named.replace("{r}", str(files)) in stderr, stderr
    # refused before any work: no sweep point (the budget cases: before the sweep), no record
    assert not list(Path(tmp_path).rglob("sweep/*/*.json")) and not list(Path(tmp_path).rglob("results/*.json"))


def test_debug_keeps_the_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dop.cli", "stage=evaluate", "policy=/nonexistent/p.yaml", "debug=true",
                          f"hydra.run.dir={tmp_path}", f"paths.output_dir={tmp_path / 'out'}", "logger=none"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "Traceback" in res.stderr and "does not exist" in res.stderr
