"""``dop stage=report``: tables (Markdown, CSV) and the accuracy-vs-FLOPs plot of the results store,
and each policy drawn as a layers x (group, type) heatmap.

    dop stage=report                                   # every record in paths.results_dir
    dop stage=report paths.results_dir=/shared/results
    dop stage=report policy=outputs/runs/tiny_llava/pipeline/policies       # heatmaps of policy files only
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dop.evaluation.benchmarks import headline_metrics
from dop.ops import PROMPT_GROUPS
from dop.policy import Policy
from dop.report import (
    build_table,
    plot_accuracy_vs_tflops,
    policy_heatmap,
    policy_title,
    table_cells,
    to_markdown,
    write_csv,
    write_markdown,
)
from dop.results import ResultsStore
from dop.stages.config import ReportStage, load
from dop.stages.schema import ConfigError
from dop.tracking import log_table, start_run

log = logging.getLogger("dop.report")


def run(cfg: DictConfig) -> dict[str, Any]:
    """``dop stage=report``."""
    conf = load(ReportStage, cfg)
    if conf.policy:  # the view of any policy file (or folder of them)
        return {"heatmaps": draw_policies(conf.policy, Path(conf.paths.run_dir))}
    return execute(conf, config=cfg)


def draw_policies(source: str | Path, out: Path) -> list[str]:
    """A heatmap PNG per policy file (a file, or every ``*.yaml`` of a folder) into ``out``."""
    source = Path(source)
    files = sorted(source.glob("*.yaml")) if source.is_dir() else [source]
    paths = []
    for f in files:
        policy = Policy.from_yaml(f)
        if policy.num_layers is None:
            raise ConfigError(f"policy file {f} has no num_layers: the heatmap needs the model's depth")
        groups = [*PROMPT_GROUPS, *sorted(policy.groups - set(PROMPT_GROUPS))]
        png = policy_heatmap(policy, policy.num_layers, groups, out / f"policy_{f.stem}.png",
                             title=policy_title(policy, f.stem))
        paths.append(str(png))
        print(f"policy {f.stem}: {png}")
    return paths


def execute(conf: ReportStage, config: Any = None, policies: Path | None = None) -> dict[str, Any]:
    """Read the store (``report_filter`` keeps matching records), write report.md/.csv/.png into the run
    dir, and a heatmap of each policy file in ``policies`` beside them."""
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
        "heatmaps": draw_policies(policies, out) if policies is not None and policies.exists() else [],
    }
    print(to_markdown(table))
    with start_run(conf.logger, "report", out, config) as wb:
        log_table(wb, "report/table", table.header(), table_cells(table))
        wb.log_image("report/accuracy_vs_tflops", paths["plot"])
        for png in paths["heatmaps"]:
            wb.log_image(f"report/{Path(png).stem}", png)
    return paths


def _matches(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, (list, tuple)):
        return value in list(wanted)
    return value == wanted
