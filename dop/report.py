"""Tables and plots from results-store records (``dop stage=report`` reads the store and calls these).

    table = build_table(ResultsStore("outputs/results").records())
    write_markdown(table, "report.md"); write_csv(table, "report.csv")
    plot_accuracy_vs_tflops(records, "acc_vs_tflops.png")

Rows are (method, budget), dense first; columns are benchmarks (each at its headline metric from
``conf/benchmark``), then ``Avg`` (mean over the row's benchmarks) and ``% dense`` (mean over
benchmarks of value / dense value, the usual way pruning papers compare methods on mixed scales).
When the store holds baselines (records with a matched knob, ``dop.engine.baselines.budget``), the table
also shows each row's prefill TFLOPs (dop convention; the mean over the evaluated samples, each
resolved at its own budget), the method's knob (the most frequent one) and its FLOPs in its own
paper's convention. Rows run at a baseline's published knob (``budget.match=nominal``) are flagged
``<method> (nominal)`` beside the equal-TFLOPs row, with their true TFLOPs.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from dop.flops import flops_unit
from dop.flops import unit_scale as flops_scale
from dop.results import Record

matplotlib.use("Agg")  # no display on cluster nodes; before pyplot
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class Row:
    model: str
    method: str
    budget_kind: str | None
    budget_value: float | None
    values: dict[str, float] = field(default_factory=dict)
    tflops: float | None = None
    avg: float | None = None
    pct_dense: float | None = None
    knob: Any = None  # a baseline's matched knob
    paper_tflops: float | None = None  # the baseline's FLOPs in its own paper's convention
    paper_convention: str | None = None

    @property
    def budget_label(self) -> str:
        if self.budget_kind is None:
            return "-"
        return f"{self.budget_kind}={self.budget_value:g}"


@dataclass
class Table:
    benchmarks: list[str]
    rows: list[Row]
    multi_model: bool = False
    baselines: bool = False  # show the Knob / Paper FLOPs columns
    unit: str | None = None  # SI prefix of the FLOPs column (None: no row has FLOPs)
    dense_tflops: dict[str, float] = field(default_factory=dict)  # per model

    def header(self) -> list[str]:
        flops = [f"{self.unit}FLOPs", "of dense"] if self.unit is not None else []
        extra = ["Knob", f"Paper {self.unit or 'T'}FLOPs"] if self.baselines else []
        return (["Model"] if self.multi_model else []) + ["Method", "Budget", *flops, *extra, *self.benchmarks,
                                                          "Avg", "% dense"]

    def share(self, row: Row) -> float | None:
        """The row's prefill FLOPs as a share of its model's dense prefill."""
        dense = self.dense_tflops.get(row.model)
        return None if row.tflops is None or not dense else row.tflops / dense

    def in_unit(self, tflops: float | None) -> float | None:
        return None if tflops is None or self.unit is None else tflops * 1e12 / flops_scale(self.unit)


def _headline(benchmark: str, metrics: Mapping[str, str] | None) -> str | None:
    return metrics.get(benchmark) if metrics else None


def build_table(records: Iterable[Record], metrics: Mapping[str, str] | None = None) -> Table:
    """One row per (model, method, budget); the newest record wins when a cell was rerun.

    ``metrics`` maps benchmark -> metric to show (the report stage passes each benchmark's headline
    metric from ``conf/benchmark/<name>.yaml``); a benchmark not in it shows its only metric.
    """
    records = sorted(records, key=lambda r: r.timestamp)
    by_bench: dict[str, set[str]] = {}
    for r in records:
        by_bench.setdefault(r.benchmark, set()).add(r.metric)
    chosen: dict[str, str] = {}
    for bench, present in by_bench.items():
        m = _headline(bench, metrics)
        if m in present:
            chosen[bench] = m
        elif len(present) == 1:
            chosen[bench] = next(iter(present))
        else:
            log.warning("report: benchmark %s has metrics %s and no headline; skipped", bench, sorted(present))
    benchmarks = sorted(chosen)

    rows: dict[tuple, Row] = {}
    for r in records:
        if chosen.get(r.benchmark) != r.metric:
            continue
        method = f"{r.method} (nominal)" if (r.extra or {}).get("match") == "nominal" else r.method
        k = (r.model, method, r.budget_kind, r.budget_value)
        row = rows.setdefault(k, Row(r.model, method, r.budget_kind, r.budget_value))
        row.values[r.benchmark] = float(r.value)
        if r.tflops is not None:
            row.tflops = float(r.tflops)
        extra = r.extra or {}
        if extra.get("knob") is not None:
            row.knob = extra["knob"]
            row.paper_tflops = extra.get("paper_tflops")
            row.paper_convention = extra.get("paper_convention")

    dense = {row.model: row for row in rows.values() if row.method == "dense"}
    for row in rows.values():
        vals = [row.values[b] for b in benchmarks if b in row.values]
        row.avg = sum(vals) / len(vals) if vals else None
        ref = dense.get(row.model)
        if ref is not None:
            ratios = [row.values[b] / ref.values[b] for b in benchmarks
                      if b in row.values and ref.values.get(b)]
            row.pct_dense = 100.0 * sum(ratios) / len(ratios) if ratios else None

    def order(row: Row):
        # dense first, then methods by name, larger budgets (less pruning) first
        return (row.model, row.method != "dense", row.method, row.budget_kind or "",
                -(row.budget_value if row.budget_value is not None else math.inf))

    models = {row.model for row in rows.values()}
    flops = [row.tflops * 1e12 for row in rows.values() if row.tflops is not None]
    return Table(benchmarks, sorted(rows.values(), key=order), multi_model=len(models) > 1,
                 baselines=any(row.knob is not None for row in rows.values()),
                 unit=flops_unit(flops) if flops else None,
                 dense_tflops={m: r.tflops for m, r in dense.items() if r.tflops is not None})


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table_cells(table: Table, digits: int = 3, raw: bool = False) -> list[list[Any]]:
    """The body as a list of rows (strings, or raw numbers for CSV)."""
    out = []
    for row in table.rows:
        cells: list[Any] = [row.model] if table.multi_model else []
        cells += [row.method, row.budget_label]
        share = table.share(row)
        if table.unit is not None:
            amount = table.in_unit(row.tflops)
            cells += [amount, share] if raw else [_fmt_sig(amount), _fmt(None if share is None else 100 * share, 1)
                                                  + ("%" if share is not None else "")]
        if table.baselines:
            paper = table.in_unit(row.paper_tflops)
            if raw:
                cells += [row.knob, paper]
            else:
                cells += ["-" if row.knob is None else str(row.knob),
                          "-" if paper is None else f"{_fmt_sig(paper)} ({row.paper_convention})"]
        for b in table.benchmarks:
            v = row.values.get(b)
            cells.append(v if raw else _fmt(v, digits))
        cells.append(row.avg if raw else _fmt(row.avg, digits))
        cells.append(row.pct_dense if raw else _fmt(row.pct_dense, 1))
        out.append(cells)
    return out


def _fmt_sig(x: float | None) -> str:
    """4 significant digits, never scientific for table-sized numbers (110.1, 9.47, 0.5234)."""
    if x is None:
        return "-"
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.3e}"


def to_markdown(table: Table, digits: int = 3) -> str:
    header = table.header()
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_cells(table, digits)]
    return "\n".join(lines) + "\n"


def write_markdown(table: Table, path: str | Path, digits: int = 3) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_markdown(table, digits))
    return path


def write_csv(table: Table, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(table.header())
        for cells in table_cells(table, raw=True):
            w.writerow(["" if c is None else c for c in cells])
    return path


def plot_accuracy_vs_tflops(records: Sequence[Record], path: str | Path, benchmark: str | None = None,
                            metrics: Mapping[str, str] | None = None) -> Path:
    """PNG: score (one benchmark, or the row average) against prefill FLOPs (in the table's SI unit; a
    second axis shows the share of dense for one model), one line per method.

    Dense is drawn as a star on every method's line end, so each curve reads as "down from dense".
    """
    table = build_table(records, metrics)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    by_method: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in table.rows:
        y = row.values.get(benchmark) if benchmark else row.avg
        if row.tflops is None or y is None:
            continue
        by_method.setdefault((row.model, row.method), []).append((table.in_unit(row.tflops), y))
    colors = plt.get_cmap("tab20").colors  # 14+ methods: the default 10-colour cycle repeats
    markers = "osD^v<>pPXh"
    for i, ((model, method), pts) in enumerate(sorted(by_method.items())):
        pts.sort()
        label = f"{model} / {method}" if table.multi_model else method
        if method == "dense":
            ax.scatter(*zip(*pts), marker="*", s=120, zorder=3, label=label, color="black")
        else:
            ours = method in ("dop", "dop_paper")  # DOP in a strong colour, drawn over the others
            ax.plot(*zip(*pts), marker=markers[i % len(markers)], label=label,
                    color="tab:red" if ours and not table.multi_model else colors[i % len(colors)],
                    linewidth=3 if ours else 1.5, zorder=4 if ours else 2)
    ax.set_xlabel(f"prefill {table.unit or 'T'}FLOPs")
    ax.set_ylabel(benchmark or "average score")
    ax.grid(alpha=0.3)
    if len(table.dense_tflops) == 1:  # one model: its share of dense on top
        dense = table.in_unit(next(iter(table.dense_tflops.values())))
        top = ax.secondary_xaxis("top", functions=(lambda x: x / dense, lambda r: r * dense))
        top.set_xlabel("share of dense prefill FLOPs")
    if by_method:
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def policy_matrix(policy: Any, num_layers: int, groups: Iterable[str],
                  types: Sequence[str] = ("q", "kv", "mlp")) -> tuple[np.ndarray, list[str]]:
    """A (num_layers, len(groups) * len(types)) 0/1 array: 1 where (layer, group, type) is pruned."""
    groups = list(groups)
    mat = np.zeros((num_layers, len(groups) * len(types)), dtype=np.float32)
    for layer in range(num_layers):
        for gi, g in enumerate(groups):
            for ti, t in enumerate(types):
                if policy is not None and policy.is_pruned(layer, g, t):
                    mat[layer, gi * len(types) + ti] = 1.0
    labels = [f"{g}/{t}" for g in groups for t in types]
    return mat, labels


def policy_title(policy: Any, name: str | None = None) -> str:
    """A one- or two-line title from a searched policy's metadata: budget, FLOPs share, KL, n_v."""
    meta = getattr(policy, "meta", None) or {}
    head = name or ""
    budget = meta.get("budget")
    if isinstance(budget, Mapping) and "kind" in budget:
        head = f"{head} ({budget['kind']} {float(budget['value']):g})" if head else f"{budget['kind']} {float(budget['value']):g}"
    facts = []
    if meta.get("ratio") is not None:
        facts.append(f"{100 * float(meta['ratio']):.1f}% of dense FLOPs")
    if meta.get("predicted_kl") is not None:
        facts.append(f"KL predicted {float(meta['predicted_kl']):.3g}")
    if meta.get("measured_kl") is not None:
        facts.append(f"measured {float(meta['measured_kl']):.3g}")
    if getattr(policy, "n_v", None) is not None:
        facts.append(f"n_v {policy.n_v} ({policy.reducer})")
    return "\n".join(x for x in (head or "policy", ", ".join(facts)) if x)


def policy_heatmap(policy: Any, num_layers: int, groups: Iterable[str], path: str | os.PathLike,
                   title: str | None = None) -> Path:
    """Save a PNG of layers x (group, type), dark = pruned (skipped), with the policy's FLOPs share and
    predicted / measured KL in the title (``policy_title``) unless ``title`` is given."""
    fig = heatmap_figure(policy, num_layers, groups, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap_figure(policy: Any, num_layers: int, groups: Iterable[str], title: str | None = None) -> Any:
    """The heatmap of ``policy_heatmap`` as a matplotlib figure (its image is ``policy_matrix``)."""
    groups = list(groups)
    mat, labels = policy_matrix(policy, num_layers, groups)
    fig, ax = plt.subplots(figsize=(2.2 + 0.5 * len(labels), 1.4 + 0.28 * num_layers))
    ax.imshow(mat, aspect="auto", cmap="Greys", vmin=0, vmax=1.25, interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(num_layers), [str(v) for v in range(num_layers)], fontsize=6 if num_layers > 16 else 7)
    for g in range(1, len(groups)):  # separate the groups' (q, kv, mlp) columns
        ax.axvline(3 * g - 0.5, color="tab:red", linewidth=0.8)
    ax.set_ylabel("layer (dark: operation skipped)")
    ax.set_title(title if title is not None else policy_title(policy), fontsize=8)
    fig.tight_layout()
    return fig
