"""Report: a fixture store -> the Markdown table written by hand; CSV and the plot exist."""

from __future__ import annotations

import csv

from stage_configs import compose_cfg

from dop.evaluation.benchmarks import headline_metrics
from dop.flops import flops_unit, format_flops
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
| Method | Budget | TFLOPs | of dense | pope | synthetic | Avg | % dense |
|---|---|---|---|---|---|---|---|
| dense | - | 3 | 100.0% | 0.800 | 0.900 | 0.850 | 100.0 |
| dop | ratio=0.5 | 1.5 | 50.0% | 0.720 | 0.900 | 0.810 | 95.0 |
| dop | ratio=0.25 | 0.75 | 25.0% | 0.400 | - | 0.400 | 50.0 |
| fastv | ratio=0.5 | 1.6 | 53.3% | - | 0.450 | 0.450 | 50.0 |
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
    assert rows[0] == ["Method", "Budget", "TFLOPs", "of dense", "pope", "synthetic", "Avg", "% dense"]
    assert rows[2][:5] == ["dop", "ratio=0.5", "1.5", "0.5", "0.72"]
    png = (tmp_path / "run" / "accuracy_vs_tflops.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_accuracy_vs_tflops(store.records(), tmp_path / "p.png", benchmark="pope",
                                   metrics=headline_metrics()).stat().st_size > 0


def test_flops_read_in_the_tables_unit():
    assert flops_unit([1.101e8, 2.6e7]) == "M" and flops_unit([9.47e12, 4.29e12]) == "T"
    assert flops_unit([999.0]) == "" and flops_unit([1.5e3]) == "K" and flops_unit([]) == ""
    assert format_flops(1.101e8, "M") == "110.10 MFLOPs"
    store_md = to_markdown(build_table([
        Record(model="m", method="dense", benchmark="b", metric="x", value=0.9, tflops=1.101e-4),
        Record(model="m", method="dop", budget_kind="ratio", budget_value=0.5, benchmark="b", metric="x",
               value=0.8, tflops=5.345e-5)]))
    assert "| MFLOPs | of dense |" in store_md
    assert "| dop | ratio=0.5 | 53.45 | 48.5% |" in store_md and "| dense | - | 110.1 | 100.0% |" in store_md
    assert "e-0" not in store_md


def test_policy_heatmap_is_drawn_from_the_policy(tmp_path):
    from dop.ops import Operation
    from dop.policy import DepthPolicy, Policy
    from dop.report import heatmap_figure, policy_heatmap, policy_matrix

    groups = ["system", "vision", "instruction"]
    policy = Policy([Operation(2, "vision", "kv"), Operation(3, "vision", "kv"), Operation(0, "system", "mlp")])
    mat, labels = policy_matrix(policy, 4, groups)
    assert labels == [f"{g}/{t}" for g in groups for t in ("q", "kv", "mlp")]
    assert {(int(r), labels[int(c)]) for r, c in zip(*mat.nonzero())} == {(2, "vision/kv"), (3, "vision/kv"),
                                                                          (0, "system/mlp")}
    fig = heatmap_figure(policy, 4, groups)
    assert (fig.axes[0].images[0].get_array() == mat).all()
    depth = DepthPolicy({("attn", "vision"): 1}).expand(4)
    depth.meta = {**depth.meta, "budget": {"kind": "ratio", "value": 0.5}, "ratio": 0.48, "predicted_kl": 0.01,
                  "measured_kl": 0.02}
    png = policy_heatmap(depth, 4, groups, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    title = heatmap_figure(depth, 4, groups).axes[0].get_title()
    assert "ratio 0.5" in title and "48.0% of dense FLOPs" in title and "KL predicted 0.01, measured 0.02" in title
