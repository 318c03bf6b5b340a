"""experiments/tables.py latency: per-sample FLOPs shares and the prefill latency distribution per row,
nominal (published-knob) baseline rows beside the matched ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dop.results import Record, ResultsStore

TABLES = Path(__file__).resolve().parent.parent / "experiments" / "tables.py"


def _tables():
    spec = importlib.util.spec_from_file_location("experiment_tables", TABLES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(method: str, tflops: float, shares: tuple[float, float, float], p: tuple[float, float, float],
            match: str | None = None, budget: float | None = None) -> Record:
    extra = {"per_sample_flops": {"mean_share": shares[0], "min_share": shares[1], "max_share": shares[2]},
             "prefill_latency": {"n": 8, "p10": p[0], "median": p[1], "p90": p[2]}}
    if match:
        extra["match"] = match
    return Record(model="m", method=method, benchmark="gqa", metric="exact_match", value=0.5, tflops=tflops,
                  prefill_latency_s=p[1], budget_kind=None if budget is None else "tokens", budget_value=budget,
                  policy_hash=None if budget is None else f"{method}{match}", extra=extra)


def test_latency_table_shows_shares_and_latency_spread(tmp_path):
    store = ResultsStore(tmp_path / "results")
    store.append(_record("dense", 4.0, (1.0, 1.0, 1.0), (0.09, 0.1, 0.12)))
    store.append(_record("fastv", 1.0, (0.25, 0.2, 0.3), (0.03, 0.04, 0.05), "flops", 128))
    store.append(_record("fastv", 1.4, (0.35, 0.3, 0.41), (0.04, 0.05, 0.06), "nominal", 128))
    (tmp_path / "root").mkdir()
    text = _tables().by_method([tmp_path / "root"], tmp_path / "results")
    rows = {line.split(" | ")[1]: line for line in text.splitlines()[2:]}
    assert set(rows) == {"dense", "fastv", "fastv (nominal)"}
    assert "0.250 [0.200, 0.300]" in rows["fastv"] and "30.00-50.00 (n=8)" in rows["fastv"]
    assert "| 75.0% |" in rows["fastv"] and "| 60.0% |" in rows["fastv"]  # FLOPs cut 1 - 1/4; prefill 1 - .04/.1
    assert "0.350 [0.300, 0.410]" in rows["fastv (nominal)"] and "| 65.0% |" in rows["fastv (nominal)"]
