"""Report: a fixture store -> the Markdown table written by hand; CSV and the plot exist."""

from __future__ import annotations

import csv

from stage_configs import compose_cfg

from dop.evaluation.benchmarks import headline_metrics
from dop.report import build_table, plot_accuracy_vs_tflops, to_markdown
from dop.results import Record, ResultsStore
from dop.stages.report import run


def _fill(store: ResultsStore) -> None:
    def add(method, kind, value, bench, metric, v, tflops, ts=1.0):
        store.append(Record(model="m", method=method, budget_kind=kind, budget_value=value, benchmark=bench,
                            metric=metric, value=v, tflops=tflops, timestamp=ts))

    add("dense", None, None, "pope", "pope_f1_score", 0.80, 3.0)
    add("dense", None, None, "pope", "pope_accuracy", 0.85, 3.0)  # not the headline: not in the table
    add("dense", None, None, "synthetic", "exact_match", 0.90, 3.0)
    add("dense", None, None, "synthetic", "exact_match", 0.10, 3.0, ts=0.5)  # an older rerun: superseded
    add("dop", "ratio", 0.5, "pope", "pope_f1_score", 0.72, 1.5)
    add("dop", "ratio", 0.5, "synthetic", "exact_match", 0.90, 1.5)
    add("dop", "ratio", 0.25, "pope", "pope_f1_score", 0.40, 0.75)
    add("fastv", "ratio", 0.5, "synthetic", "exact_match", 0.45, 1.6)


HAND = """\
| Method | Budget | pope | synthetic | Avg | % dense |
|---|---|---|---|---|---|
| dense | - | 0.800 | 0.900 | 0.850 | 100.0 |
| dop | ratio=0.5 | 0.720 | 0.900 | 0.810 | 95.0 |
| dop | ratio=0.25 | 0.400 | - | 0.400 | 50.0 |
| fastv | ratio=0.5 | - | 0.450 | 0.450 | 50.0 |
"""


def test_markdown_equals_hand_table(tmp_path):
    store = ResultsStore(tmp_path)
    _fill(store)
    assert to_markdown(build_table(store.records(), headline_metrics())) == HAND


def test_run_writes_markdown_csv_plot(tmp_path):
    store = ResultsStore(tmp_path / "results")
    _fill(store)
    paths = run(compose_cfg(tmp_path / "run", f"paths.results_dir={tmp_path / 'results'}"))
    assert (tmp_path / "run" / "report.md").read_text() == HAND
    rows = list(csv.reader(open(paths["csv"])))
    assert rows[0] == ["Method", "Budget", "pope", "synthetic", "Avg", "% dense"]
    assert rows[2][:3] == ["dop", "ratio=0.5", "0.72"]
    png = (tmp_path / "run" / "accuracy_vs_tflops.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_accuracy_vs_tflops(store.records(), tmp_path / "p.png", benchmark="pope",
                                   metrics=headline_metrics()).stat().st_size > 0
