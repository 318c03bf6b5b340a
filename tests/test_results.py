"""The results store: round trip, filters, skip-if-done, and concurrent appends that lose nothing."""

from __future__ import annotations

import json
import multiprocessing as mp

from dop.results import Record, ResultsStore


def _rec(**kw) -> Record:
    base = dict(model="tiny_llava", method="dense", benchmark="synthetic", metric="exact_match", value=0.9)
    return Record(**{**base, **kw})


def test_round_trip_and_filters(tmp_path):
    store = ResultsStore(tmp_path)
    p = store.append(_rec(tflops=0.001, versions={"torch": "2.13"}, extra={"note": 1}))
    assert p.parent == tmp_path and p.suffix == ".json" and not list(tmp_path.glob(".*"))
    store.append(_rec(method="dop", policy_hash="abc", budget_kind="ratio", budget_value=0.5, value=0.8))
    (back,) = store.records(method="dense")
    assert back.tflops == 0.001 and back.versions == {"torch": "2.13"} and back.extra == {"note": 1}
    assert back.record_id == p.stem
    assert [r.value for r in store.records(budget_kind="ratio")] == [0.8]
    assert json.loads(p.read_text())["metric"] == "exact_match"


def test_exists_for_skip_if_done(tmp_path):
    store = ResultsStore(tmp_path)
    r = _rec(method="dop", policy_hash="abc", budget_kind="ratio", budget_value=0.5)
    assert not store.exists(r.key)
    store.append(r)
    assert store.exists(r.key)
    assert store.exists(("tiny_llava", "dop", "abc", "ratio", 0.5, "synthetic", "exact_match"))
    assert not store.exists(("tiny_llava", "dop", "abc", "ratio", 0.35, "synthetic", "exact_match"))


def _writer(root: str, worker: int, n: int) -> None:
    store = ResultsStore(root)
    for i in range(n):
        store.append(_rec(benchmark=f"b{i % 3}", value=float(worker * 1000 + i)))


def test_concurrent_appends_lose_no_record(tmp_path):
    workers, per = 6, 25
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, per)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    values = sorted(r.value for r in ResultsStore(tmp_path).records())
    assert values == sorted(float(w * 1000 + i) for w in range(workers) for i in range(per))


def test_latest_supersedes_reruns(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_rec(value=0.1, timestamp=1.0))
    store.append(_rec(value=0.2, timestamp=2.0))
    (latest,) = store.latest().values()
    assert latest.value == 0.2
