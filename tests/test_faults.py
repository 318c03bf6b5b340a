"""Faults a long run survives (issue 18): a real ``kill -9`` in the middle of a sweep, and a full disk
while a sweep point is written. Either way the store keeps only whole points, and the same command
resumes to a store equal, point for point, to an uninterrupted run's."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_sweep_store import store_values, tiny_job

from dop import io as dop_io
from dop.models import TINY_LLAVA_DIR
from dop.sweep import SweepStore

needs_tiny = pytest.mark.skipif(not (TINY_LLAVA_DIR / "config.json").exists(), reason="tiny_llava not shipped")


def test_a_full_disk_while_writing_a_point_resumes_to_the_same_store(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    reference = tiny_job(tmp_path / "ref")
    reference.run()

    writes = {"n": 0}
    real_fsync = os.fsync

    def fsync_until_full(fd):  # the 6th file written finds the disk full
        writes["n"] += 1
        if writes["n"] == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(dop_io.os, "fsync", fsync_until_full)
    with pytest.raises(OSError, match="No space left"):
        tiny_job(tmp_path / "run").run()
    sweep = tmp_path / "run" / "sweep"
    assert not list(sweep.rglob("*.tmp"))  # the failed write left no partial file
    written = len(SweepStore(sweep).points())
    assert 0 < written < len(reference.points())

    monkeypatch.setattr(dop_io.os, "fsync", real_fsync)  # space freed: the same job again
    stats = tiny_job(tmp_path / "run").run()
    assert stats["skipped"] == written
    assert store_values(SweepStore(sweep)) == store_values(reference.store)


def _sweep_cmd(run_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "dop.cli", "stage=sweep", "logger=none", "num_threads=1",
            "method.num_calibration=8", "data.sizes.train=8", "data.sizes.val=16", "data.sizes.test=8",
            f"paths.output_dir={out}", f"hydra.run.dir={run_dir}"]


_VOLATILE = ("seconds", "layer_forwards", "naive_layer_forwards")  # how long / how it was computed


def _points(run_dir: Path) -> dict[str, dict]:
    """Each point's values (KL, per-sample KL, fingerprint, where) by file."""
    return {str(p.relative_to(run_dir)): {k: v for k, v in json.loads(p.read_text()).items() if k not in _VOLATILE}
            for p in (run_dir / "sweep").glob("*/*.json") if p.parent.name != "shards"}


@needs_tiny
def test_kill_9_mid_sweep_resumes_to_the_uninterrupted_store(tmp_path):
    out = tmp_path / "out"  # one data folder for both runs
    subprocess.run(_sweep_cmd(tmp_path / "ref", out), check=True, capture_output=True, timeout=900)
    reference = _points(tmp_path / "ref")

    run = tmp_path / "run"
    proc = subprocess.Popen(_sweep_cmd(run, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(_points(run)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    partial = _points(run)
    assert 0 < len(partial) < len(reference)
    for key, values in partial.items():  # every point on disk is whole, and already the final one
        assert values == reference[key], key

    subprocess.run(_sweep_cmd(run, out), check=True, capture_output=True, timeout=900)
    assert _points(run) == reference


def test_search_store_links_resolve_from_a_relative_output_dir(tmp_path, monkeypatch):
    """paths.output_dir=outputs (the default) is relative: the run's links into the store must not dangle."""
    from dop.stages.store import SearchLocation

    monkeypatch.chdir(tmp_path)
    search = Path("outputs/searches/m/sweep-1/search-1")
    (search / "policies").mkdir(parents=True)
    (search / "search.json").write_text("{}")
    loc = SearchLocation(search_dir=search, sweep_dir=None, lock_dir=Path("outputs/searches/m/sweep-1"))
    run = Path("outputs/runs/m/pipeline")
    loc.link(run)
    loc.link(run)  # idempotent
    assert (run / "search.json").read_text() == "{}" and (run / "policies").is_dir()
    assert not Path(os.readlink(run / "search.json")).is_absolute()
