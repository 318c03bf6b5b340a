"""A results store shared by jobs and people: tolerant on read, strict on write, group-readable files,
nothing lost when it cannot be written; one prune() per model at a time (issue 18)."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
import torch

from dop.engine import EngineError, prune
from dop.io import atomic_write_json
from dop.ops import Operation
from dop.policy import Policy
from dop.results import Record, RecordError, ResultsStore


def _record(**kw) -> Record:
    return Record(**{"model": "m", "method": "dense", "benchmark": "b", "metric": "acc", "value": 0.5, **kw})


def test_stray_files_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    store = ResultsStore(tmp_path)
    good = store.append(_record())
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "string_value.json").write_text(json.dumps({**_record().to_dict(), "value": "high"}))
    (tmp_path / "string_time.json").write_text(json.dumps({**_record().to_dict(), "timestamp": "yesterday"}))
    (tmp_path / "truncated.json").write_text('{"model": "m"')
    with caplog.at_level(logging.WARNING):
        records = store.records()
        latest = store.latest()  # sorts by timestamp: a string one would crash it
    assert [r.record_id for r in records] == [good.stem] and len(latest) == 1
    for name in ("list.json", "string_value.json", "string_time.json", "truncated.json"):
        assert any(name in m for m in caplog.messages), name


def test_records_are_checked_before_they_are_written(tmp_path):
    store = ResultsStore(tmp_path)
    for bad, field in ((dict(value="0.5"), "value"), (dict(timestamp="now"), "timestamp"),
                       (dict(model=""), "model"), (dict(samples=2.5), "samples"), (dict(tflops="1"), "tflops")):
        with pytest.raises(RecordError, match=f"record field '{field}'"):
            store.append(_record(**bad))
    assert not list(tmp_path.glob("*.json"))


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        rec = ResultsStore(tmp_path / "store").append(_record())
        pol = Policy([Operation(0, "vision", "kv")])
        pol.to_yaml(tmp_path / "p.yaml")
        point = atomic_write_json(tmp_path / "sweep" / "kv_vision" / "0.json", {"kl": 0.1})
        from dop.data.synthetic import ensure_dataset

        data = ensure_dataset(tmp_path / "data", sizes={"train": 2, "val": 2, "test": 2})
    finally:
        os.umask(old)
    for path in (rec, tmp_path / "p.yaml", point):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE(data.stat().st_mode) == 0o755
    os.umask(0o002)  # a lab's shared store: group-writable
    try:
        shared = ResultsStore(tmp_path / "shared").append(_record())
    finally:
        os.umask(old)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664


def test_an_unwritable_store_keeps_the_metrics_beside_the_run(tmp_path, monkeypatch):
    """The store fails after the evaluation ran (a full disk, a lost mount): the record is kept in the run
    dir, the failure says where, and nothing is lost."""
    from evaluation_fixtures import save_synthetic, save_tiny_llava
    from stage_configs import compose_cfg

    from dop.stages import evaluate

    model_dir, data = save_tiny_llava(tmp_path / "model"), save_synthetic(tmp_path / "data", n=4)

    def full_disk(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ResultsStore, "append", full_disk)
    monkeypatch.setattr(evaluate.time, "sleep", lambda s: None)
    cfg = compose_cfg(tmp_path / "run", "stage=evaluate", "device=cpu", "model.name=tiny_test",
                      f"model.pretrained={model_dir}", "model.dtype=null", "benchmark=synthetic", "benchmark.limit=2",
                      "benchmark.batch_size=2", f"benchmark.dataset_path={data}", "fail_on_error=false",
                      f"paths.results_dir={tmp_path / 'results'}")
    out = evaluate.run(cfg)
    (kept,) = list((tmp_path / "run" / "unsaved_records").glob("*.json"))
    rec = Record.from_dict(json.loads(kept.read_text()))
    assert rec.method == "dense" and rec.metric == "exact_match" and rec.samples == 2
    assert any("No space left" in f and str(kept) in f for f in out["failures"])


def test_nested_prune_on_one_model_is_refused():
    from tiny_models import build_llava

    model = build_llava(attn="sdpa")[0]
    a, b = Policy([Operation(1, "vision", "kv")]), Policy([Operation(2, "vision", "mlp")])
    with prune(model, a):
        with pytest.raises(EngineError, match="already inside a prune"), prune(model, b):
            pass
    with prune(model, b):  # the first block's exit frees the model
        pass
    assert all("forward" not in layer.__dict__ for layer in model.model.language_model.layers)
    with torch.no_grad(), prune(model, a | b):  # what to do instead: one policy
        pass
