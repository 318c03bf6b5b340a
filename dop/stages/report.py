"""``dop stage=report``: tables (Markdown, CSV) and the accuracy-vs-TFLOPs plot of the results store.

    dop stage=report                                   # every record in paths.results_dir
    dop stage=report paths.results_dir=/shared/results
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dop.evaluation.benchmarks import headline_metrics
from dop.report import (
    build_table,
    plot_accuracy_vs_tflops,
    table_cells,
    to_markdown,
    write_csv,
    write_markdown,
)
from dop.results import ResultsStore
from dop.stages.config import ReportStage, load
from dop.tracking import log_table, start_run

log = logging.getLogger("dop.report")


def run(cfg: DictConfig) -> dict[str, str]:
    """``dop stage=report``."""
    return execute(load(ReportStage, cfg), config=cfg)


def execute(conf: ReportStage, config: Any = None) -> dict[str, str]:
    """Read the store (``report_filter`` keeps matching records), write report.md/.csv/.png into the run dir."""
    store = ResultsStore(conf.paths.results_dir)
    records = list(store.latest().values())
    if conf.report_filter:  # e.g. {model: tiny_llava, benchmark: [synthetic]}
        records = [r for r in records
                   if all(_matches(getattr(r, k, None), v) for k, v in conf.report_filter.items())]
    out = Path(conf.paths.run_dir)
    if not records:
        log.warning("report: no records in %s", store.root)
    metrics = headline_metrics()
    table = build_table(records, metrics)
    paths = {
        "markdown": str(write_markdown(table, out / "report.md")),
        "csv": str(write_csv(table, out / "report.csv")),
        "plot": str(plot_accuracy_vs_tflops(records, out / "accuracy_vs_tflops.png", metrics=metrics)),
    }
    print(to_markdown(table))
    with start_run(conf.logger, "report", out, config) as wb:
        log_table(wb, "report/table", table.header(), table_cells(table))
        wb.log_image("report/accuracy_vs_tflops", paths["plot"])
    return paths


def _matches(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, (list, tuple)):
        return value in list(wanted)
    return value == wanted
