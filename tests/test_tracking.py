"""Tracking: W&B offline writes the logged metrics under the run dir; logger=none is a no-op."""

from __future__ import annotations

import time

import pytest

from dop.ops import Operation
from dop.policy import Policy
from dop.report import policy_heatmap, policy_matrix
from dop.tracking import LoggerConfig, NullRun, log_metrics, log_table, start_run


def _cfg(name="wandb", mode="offline"):
    return LoggerConfig(name=name, mode=mode, project="dop-test", entity=None, tags=["test"])


def test_offline_run_holds_logged_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    policy = Policy([Operation(1, "vision", "kv"), Operation(1, "vision", "mlp")])
    with start_run(_cfg(), "evaluate", tmp_path) as run:
        log_metrics(run, {"eval/synthetic/exact_match": 0.8125, "ignored": "text"})
        log_table(run, "eval/results", ["benchmark", "value"], [["synthetic", 0.8125]])
        png = policy_heatmap(policy, 2, ["system", "vision", "instruction"], tmp_path / "policy.png")
        run.log_image("policy/heatmap", png)
    (run_dir,) = list((tmp_path / "wandb").glob("offline-run-*"))
    (data,) = list(run_dir.glob("*.wandb"))
    raw = data.read_bytes()
    for _ in range(60):  # W&B's writer process may still be flushing on a loaded machine
        if b"0.8125" in raw:
            break
        time.sleep(0.5)
        raw = data.read_bytes()
    # the .wandb log holds the history records: key and value are stored as JSON text
    assert b"eval/synthetic/exact_match" in raw and b"0.8125" in raw
    assert list(run_dir.rglob("*.table.json")) and png.is_file()
    assert list(run_dir.rglob("media/images/policy/*.png"))


def test_failed_block_still_finishes_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    with pytest.raises(RuntimeError, match="boom"):
        with start_run(_cfg(), "evaluate", tmp_path):
            raise RuntimeError("boom")
    assert wandb.run is None  # finished, so the next run is not a child of a dangling one


def test_logger_none_is_a_noop(tmp_path):
    with start_run(_cfg("none", "disabled"), "report", tmp_path) as run:
        assert isinstance(run, NullRun)
        log_metrics(run, {"a": 1.0})
        log_table(run, "t", ["a"], [[1]])
        run.log_image("policy/heatmap", tmp_path / "none.png")  # a no-op: nothing is read or written
    assert not (tmp_path / "wandb").exists()


def test_policy_matrix_marks_pruned_ops():
    mat, labels = policy_matrix(Policy([Operation(1, "vision", "kv")]), 2, ["system", "vision"])
    assert mat.shape == (2, 6) and labels[4] == "vision/kv"
    assert mat.sum() == 1 and mat[1, 4] == 1
