"""Sweep store: resume, shards + merge, fingerprints, corrupt files (tiny random LLaVA, real engine)."""

from __future__ import annotations

import json

import pytest
import torch

from dop.divergence import CalibrationBatch, DivergenceError
from dop.sweep import (
    PointScorer,
    SweepError,
    SweepJob,
    SweepPoint,
    SweepStore,
    merge_stores,
    shard_points,
    sweep_points,
)

pytest.importorskip("dop.engine")

_MODELS: dict = {}


def tiny_model(layers: int = 3):
    """A tiny random LLaVA (tests/tiny_models.py), built once per session per depth."""
    if layers not in _MODELS:
        from tiny_models import build_llava

        _MODELS[layers] = build_llava(layers=layers)
    return _MODELS[layers]


def tiny_batches(n_batches: int = 2, batch: int = 2, layers: int = 3) -> list[CalibrationBatch]:
    _, make = tiny_model(layers)
    out = []
    for i in range(n_batches):
        inputs = dict(make(batch=batch, seed=i))
        B, T = inputs["input_ids"].shape
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[:, -1] = True
        out.append(CalibrationBatch(inputs, mask, [f"b{i}s{j}" for j in range(B)]))
    return out


def tiny_job(run_dir, layers: int = 3, **kw) -> SweepJob:
    model, _ = tiny_model(layers)
    return SweepJob(model, tiny_batches(layers=layers), model_id="tiny-random", run_dir=run_dir, **kw)


def store_values(store: SweepStore) -> dict:
    out = {}
    for p in store.points():
        doc = store.read(p)
        out[p.key] = (doc["kl"], tuple(doc["kl_per_sample"]), doc["fingerprint"])
    return out


class _Killed(RuntimeError):
    pass


def test_resume_recomputes_nothing(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    reference = tiny_job(tmp_path / "ref")
    reference.run()
    total = len(reference.points())

    calls = {"n": 0, "kill_after": 7}
    original = PointScorer.score_point

    def counting(self, point):
        if calls["kill_after"] is not None and calls["n"] >= calls["kill_after"]:
            raise _Killed("simulated kill")
        calls["n"] += 1
        return original(self, point)

    monkeypatch.setattr(PointScorer, "score_point", counting)
    with pytest.raises(_Killed):
        tiny_job(tmp_path / "run").run()
    assert len(SweepStore(tmp_path / "run" / "sweep").points()) == 7

    calls.update(n=0, kill_after=None)
    stats = tiny_job(tmp_path / "run").run()
    assert calls["n"] == total - 7 and stats["skipped"] == 7
    assert store_values(SweepStore(tmp_path / "run" / "sweep")) == store_values(reference.store)

    calls["n"] = 0  # a finished sweep computes nothing
    assert tiny_job(tmp_path / "run").run()["computed"] == 0 and calls["n"] == 0


def test_shards_then_merge_equal_single_run(tmp_path):
    torch.set_num_threads(1)
    single = tiny_job(tmp_path / "single")
    single.run()
    n = 3
    for k in range(n):
        stats = tiny_job(tmp_path / f"shard{k}", shard=k, num_shards=n).run()
        assert stats["points"] == len(shard_points(single.points(), k, n))
    target = SweepStore(tmp_path / "merged" / "sweep")
    report = merge_stores(target, [tmp_path / f"shard{k}" for k in range(n)])
    assert report["complete"] and report["copied"] == len(single.points())
    assert store_values(target) == store_values(single.store)


def test_merge_refuses_other_reference(tmp_path):
    torch.set_num_threads(1)
    a = tiny_job(tmp_path / "a", shard=0, num_shards=2)
    a.run()
    other = tiny_job(tmp_path / "b", shard=1, num_shards=2)
    meta = other.meta()
    meta["fingerprint"] = "0" * 16  # as if another model / calibration set
    SweepStore(tmp_path / "b" / "sweep").check_meta(meta)
    with pytest.raises(SweepError, match="different dense references"):
        merge_stores(SweepStore(tmp_path / "m" / "sweep"), [tmp_path / "a", tmp_path / "b"])


def test_corrupt_point_is_named_and_others_kept(tmp_path):
    torch.set_num_threads(1)
    job = tiny_job(tmp_path / "run")
    job.run()
    bad = job.store.path(SweepPoint("kv", "vision", 1))
    bad.write_text("{not json")
    before = len(list((tmp_path / "run" / "sweep").rglob("*.json")))
    with pytest.raises(SweepError, match=str(bad).replace(".", r"\.")):
        tiny_job(tmp_path / "run").run()
    with pytest.raises(SweepError, match="corrupt sweep point file"):
        job.store.curves(job.pairs, job.num_layers)
    assert len(list((tmp_path / "run" / "sweep").rglob("*.json"))) == before  # nothing deleted
    bad.unlink()  # the documented fix: delete that one file, rerun recomputes it alone
    assert tiny_job(tmp_path / "run").run()["computed"] == 1


def test_store_of_another_reference_is_refused(tmp_path):
    torch.set_num_threads(1)
    job = tiny_job(tmp_path / "run")
    meta = job.meta()
    meta["fingerprint"] = "f" * 16
    job.store.check_meta(meta)
    with pytest.raises(SweepError, match="use another run dir"):
        job.run()


def test_points_grid_and_shards():
    pts = sweep_points([("kv", "vision"), ("q", "vision")], 8, step=3)
    assert [p.depth for p in pts[:4]] == [0, 3, 6, 8]
    shards = [shard_points(pts, k, 3) for k in range(3)]
    assert sorted(p for s in shards for p in s) == sorted(pts)
    with pytest.raises(SweepError):
        shard_points(pts, 3, 3)


def test_missing_group_and_empty_calibration(tmp_path):
    model, _ = tiny_model()
    with pytest.raises(SweepError, match="not a token group"):
        SweepJob(model, tiny_batches(), model_id="t", run_dir=tmp_path, pairs=[("kv", "audio")])
    with pytest.raises(DivergenceError, match="empty"):
        SweepJob(model, [], model_id="t", run_dir=tmp_path)


def test_point_record_layout(tmp_path):
    torch.set_num_threads(1)
    job = tiny_job(tmp_path / "run")
    job.run()
    doc = json.loads((tmp_path / "run" / "sweep" / "kv_vision" / "0.json").read_text())
    assert {"kl", "kl_per_sample", "fingerprint", "layer_forwards", "type", "group", "depth"} <= set(doc)
    assert json.loads((tmp_path / "run" / "sweep" / "kv_vision" / "3.json").read_text())["kl"] == 0.0
