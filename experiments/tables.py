"""Markdown tables of the paper-table experiments, from their run dirs and the results store.

    python experiments/tables.py ablation_additive                 # outputs/experiments/ablation_additive/*
    python experiments/tables.py ablation_space --out experiments/results/ablation_space_tiny.md
    python experiments/tables.py latency --root <sweep dir> --results <results store>

Every number comes from a run dir (``search.json``, ``result.json``, ``policies/``) or a record of
the results store; nothing is recomputed except the FLOPs of the additive check's random candidates
(``dop.flops.count_flops``, exact) and their depths (``dop.search.random_depth_policies`` with the
run's seed, checked against the stored predictions).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

EXPERIMENTS = ["main_table", "latency", "ablation_additive", "ablation_data", "ablation_time", "ablation_transfer",
               "ablation_space", "ablation_objective", "ablation_nv"]
DOP_METHODS = ("dop", "dop_paper")  # records of searched policies (conf/method/dop*.yaml)


def fmt(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def run_dirs(root: Path, marker: str) -> list[Path]:
    return sorted(p.parent for p in root.rglob(marker) if ".submitit" not in p.parts)


def run_config(run_dir: Path) -> Any:
    path = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def store_records(results: Path) -> list[Any]:
    from dop.results import ResultsStore

    return ResultsStore(results).records()


def latest(records: list[Any]) -> dict[tuple, Any]:
    """The newest record per cell key."""
    out: dict[tuple, Any] = {}
    for r in sorted(records, key=lambda r: r.timestamp):
        out[tuple(r.key)] = r
    return out


def policy_hashes(run_dir: Path) -> dict[str, str]:
    from dop.policy import Policy

    return {f.stem: Policy.from_yaml(f).digest() for f in sorted((run_dir / "policies").glob("*.yaml"))}


# --- ablation_additive ------------------------------------------------------------------------------
def additive(root: Path, results: Path) -> str:
    from transformers import AutoConfig

    from dop.flops import count_flops
    from dop.models import resolve_path
    from dop.policy import DepthPolicy
    from dop.search import predict_kl, random_depth_policies
    from dop.space import pair_ops, parse_pair

    corr_rows, pick_rows = [], []
    for run in run_dirs(root, "search.json"):
        s = json.loads((run / "search.json").read_text())
        check = s.get("additive_check")
        if not check:
            continue
        cfg = run_config(run)
        seed = int(cfg.seed) if cfg is not None else 0
        label = str(run.relative_to(root))
        corr_rows.append([label, s["model"], s["num_layers"], len(s["pairs"]), check["n"], fmt(check["pearson"], ".3f"),
                          fmt(check["spearman"], ".3f"), fmt(check["mean_ratio"], ".3f")])
        pairs = [parse_pair(p) for p in s["pairs"]]
        L = int(s["num_layers"])
        cands = random_depth_policies(pairs, L, int(check["n"]), seed=seed)
        text = AutoConfig.from_pretrained(resolve_path(s["model"])).get_text_config()
        flops = []
        for d in cands:
            ops = {op: depth for p, depth in d.items() for op in pair_ops(p)}
            flops.append(count_flops(text, s["groups"], DepthPolicy(ops).expand(L), convention=s["convention"]))
        points = check["points"]
        # the stored predictions must be these candidates': same seed, same order
        curves_ok = all(abs(predict_kl_from(s, run, d, predict_kl) - pt[0]) <= 1e-9 * max(1.0, abs(pt[0]))
                        for d, pt in zip(cands, points))
        for name, entry in sorted(s["budgets"].items(), key=lambda kv: -kv[1]["budget"]["flops"]):
            limit = entry["budget"]["flops"]
            fit = [i for i in range(len(cands)) if flops[i] <= limit * (1 + 1e-12)]
            if not fit:
                pick_rows.append([label, name, 0, "-", "-", "-", "-", fmt(entry["measured_kl"])])
                continue
            chosen = min(fit, key=lambda i: points[i][0])
            best = min(fit, key=lambda i: points[i][1])
            rank = 1 + sorted(fit, key=lambda i: points[i][1]).index(chosen)
            pick_rows.append([label, name, len(fit), fmt(points[chosen][1]), fmt(points[best][1]),
                              f"{rank} of {len(fit)}", fmt(points[chosen][1] / points[best][1] if points[best][1] else None, ".2f"),
                              fmt(entry["measured_kl"])])
        if not curves_ok:
            print(f"warning: {run}: recomputed candidates do not match the stored predictions", file=sys.stderr)
    out = ["## Additive estimate vs measured joint KL (random depth policies)", "",
           table(["run", "model", "layers", "parameters", "N", "Pearson", "Spearman", "mean measured/predicted"],
                 corr_rows), "",
           "## Additive-chosen vs best measured among the N candidates that fit each budget", "",
           "Among the random candidates whose exact FLOPs fit the budget, the one with the least *predicted* "
           "KL (additive-chosen) vs the one with the least *measured* KL; the last column is the exact "
           "solver's policy (searched over all depth policies, not only the candidates), measured.", "",
           table(["run", "budget", "candidates fitting", "chosen: measured KL", "best measured KL", "rank of chosen",
                  "chosen / best", "exact solver: measured KL"], pick_rows)]
    return "\n".join(out)


def predict_kl_from(search: dict, run: Path, depths: dict, predict_kl) -> float:
    from dop.space import interpolate_curve, pair_key

    curves = {}
    for pair in depths:
        pts = {int(p.stem): json.loads(p.read_text())["kl"] for p in (run / "sweep" / pair_key(pair)).glob("*.json")}
        curves[pair] = interpolate_curve(pts, int(search["num_layers"]))
    return predict_kl(curves, depths)


# --- pipeline ablations (data / time / space / objective) --------------------------------------------
def pipeline_ablation(root: Path, results: Path, variant_key: str | None = None) -> str:
    records = latest(store_records(results))
    by_hash: dict[str, list[Any]] = {}
    dense: dict[tuple, Any] = {}
    for r in records.values():
        if r.method == "dense":
            dense[(r.model, r.benchmark, r.metric)] = r
        elif r.policy_hash:
            by_hash.setdefault(r.policy_hash, []).append(r)
    rows = []

    def order(run: Path) -> tuple:
        cfg = run_config(run)
        v = OmegaConf.select(cfg, variant_key) if (cfg is not None and variant_key) else None
        return (0, v, str(run)) if isinstance(v, (int, float)) else (1, 0, str(run))

    runs = sorted(run_dirs(root, "search.json"), key=order)
    # the front end's column, when any run searched n_v ("all": every visual token kept)
    with_nv = any("n_v" in json.loads((run / "search.json").read_text()) for run in runs)
    for run in runs:
        s = json.loads((run / "search.json").read_text())
        res = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else {}
        cfg = run_config(run)
        label = str(run.relative_to(root))
        hashes = policy_hashes(run)
        search_s = (res.get("timings") or {}).get("search_s")
        for name, entry in sorted(s["budgets"].items(), key=lambda kv: -kv[1]["ratio"]):
            model = str(cfg.model.name) if cfg is not None else None
            recs = [r for r in by_hash.get(hashes.get(name, ""), []) if model is None or r.model == model]
            for r in recs or [None]:
                d = dense.get((r.model, r.benchmark, r.metric)) if r else None
                rows.append([label, name, fmt(entry["ratio"], ".3f"), fmt(entry["predicted_kl"]), fmt(entry["measured_kl"]),
                             r.benchmark if r else "-", fmt(r.value, ".3f") if r else "-", fmt(d.value, ".3f") if d else "-",
                             r.samples if r else "-", fmt(search_s, ".1f"),
                             fmt(OmegaConf.select(cfg, variant_key), "") if (cfg is not None and variant_key) else ""])
                if with_nv:
                    rows[-1].append("all" if entry.get("n_v") is None else entry["n_v"])
    header = ["run", "budget", "of dense FLOPs", "pred. KL", "meas. KL", "benchmark", "value", "dense", "n",
              "search s", variant_key or ""] + (["n_v"] if with_nv else [])
    return table(header, rows)


# --- store-only tables ------------------------------------------------------------------------------
def by_method(roots: list[Path], results: Path) -> str:
    """main_table / latency: one row per (model, method, budget), benchmarks as columns, latency cuts."""
    records = latest(store_records(results))
    # DOP rows: only the policies searched under root (the store may hold other experiments' too)
    mine = {h for root in roots for run in run_dirs(root, "search.json") for h in policy_hashes(run).values()}
    models = {str(cfg.model.name) for root in roots for p in root.rglob("config.yaml")
              if p.parent.name == ".hydra" and (cfg := OmegaConf.load(p)).get("model")}
    records = {k: r for k, r in records.items()
               if (r.method not in DOP_METHODS or r.policy_hash in mine) and (not models or r.model in models)}
    benches = sorted({r.benchmark for r in records.values()})
    rows: dict[tuple, dict[str, Any]] = {}
    for r in records.values():
        key = (r.model, r.method, r.budget_kind or "", r.budget_value if r.budget_value is not None else math.inf)
        if (r.extra or {}).get("match") == "nominal":  # a baseline at its published knob, beside the matched row
            key = (key[0], f"{key[1]} (nominal)", *key[2:])
        row = rows.setdefault(key, {"tflops": r.tflops, "prefill": r.prefill_latency_s, "total": [], "n": 0,
                                    "share": (r.extra or {}).get("per_sample_flops") or {},
                                    "latency": (r.extra or {}).get("prefill_latency") or {}})
        row[r.benchmark] = r.value
        if r.total_latency_s and r.samples:
            row["total"].append(r.total_latency_s / r.samples)
    dense = {k[0]: v for k, v in rows.items() if k[1] == "dense"}
    out = []
    for key in sorted(rows, key=lambda k: (k[0], k[1] != "dense", k[1], -k[3])):
        row, d = rows[key], dense.get(key[0])
        e2e = sum(row["total"]) / len(row["total"]) if row["total"] else None
        d_e2e = (sum(d["total"]) / len(d["total"])) if d and d["total"] else None
        cut = lambda a, b: (1 - a / b) if (a is not None and b) else None  # noqa: E731
        share, lat = row["share"], row["latency"]
        spread = (f"{share['mean_share']:.3f} [{share['min_share']:.3f}, {share['max_share']:.3f}]"
                  if share.get("mean_share") is not None else "-")
        p10_p90 = (f"{lat['p10'] * 1e3:.2f}-{lat['p90'] * 1e3:.2f} (n={lat['n']})" if lat.get("n") else "-")
        out.append([key[0], key[1], "-" if key[1] == "dense" else f"{key[2]} {key[3]:g}", fmt(row["tflops"], ".4g"),
                    fmt(cut(row["tflops"], d and d["tflops"]), ".1%"), spread,
                    fmt(row["prefill"] and row["prefill"] * 1e3, ".2f"), p10_p90,
                    fmt(cut(row["prefill"], d and d["prefill"]), ".1%"), fmt(e2e and e2e * 1e3, ".2f"),
                    fmt(cut(e2e, d_e2e), ".1%"), *[fmt(row.get(b), ".3f") for b in benches]])
    # TFLOPs: the mean over the evaluated samples, each at its own budget; share of dense: mean [min, max]
    # per sample; prefill ms: the median batch-1 prefill over each benchmark's first latency_samples inputs
    return table(["model", "method", "budget", "TFLOPs", "FLOPs cut", "share of dense [min, max]", "prefill ms",
                  "prefill p10-p90 ms", "prefill cut", "e2e ms/sample", "e2e cut", *benches], out)


def transfer(root: Path, results: Path) -> str:
    """Source model (rows) x target model, per budget: the transfer runs under ``root`` name their
    source policies (``policy=<source run>/policies``); native cells are the same policies'
    records on their own model."""
    sources: dict[str, str] = {}  # source run dir -> source model name
    for run in sorted(p.parent.parent for p in root.rglob("config.yaml") if p.parent.name == ".hydra"):
        cfg = run_config(run)
        if cfg is None or not OmegaConf.select(cfg, "policy"):
            continue
        src = Path(str(cfg.policy)).parent.resolve()
        src_cfg = run_config(src)
        sources[str(src)] = str(src_cfg.model.name) if src_cfg is not None else str(src)
    records = latest(store_records(results))
    by_cell = {(r.model, r.policy_hash, r.benchmark): r for r in records.values() if r.method in DOP_METHODS}
    targets = sorted({r.model for r in by_cell.values()
                      if any(r.policy_hash in policy_hashes(Path(src)).values() for src in sources)})
    benches = sorted({r.benchmark for r in by_cell.values()})
    dense = {(r.model, r.benchmark): r for r in records.values() if r.method == "dense"}
    rows = []
    for bench in benches:
        for src, source in sorted(sources.items(), key=lambda kv: kv[1]):
            hashes = policy_hashes(Path(src))
            for budget in sorted(hashes, key=lambda b: -float(b.rsplit("_", 1)[-1])):
                row = [source, budget, bench]
                for t in targets:
                    r, d = by_cell.get((t, hashes[budget], bench)), dense.get((t, bench))
                    share = f" ({r.tflops / d.tflops:.2f} of dense)" if (r and d and d.tflops) else ""
                    row.append("-" if r is None else f"{r.value:.3f}{share}")
                rows.append(row)
        rows.append(["dense", "-", bench, *[fmt(getattr(dense.get((t, bench)), "value", None), ".3f") for t in targets]])
    return table(["source policy from", "budget (source)", "benchmark", *[f"on {t}" for t in targets]], rows)


def dense_tflops(records: dict, model: str) -> float | None:
    for r in records.values():
        if r.method == "dense" and r.model == model and r.tflops:
            return r.tflops
    return None


def build(name: str, root: Path, results: Path) -> str:
    if name == "ablation_additive":
        return additive(root, results)
    if name in ("main_table", "latency"):
        return by_method([root], results)
    if name == "ablation_transfer":
        return transfer(root, results)
    key = {"ablation_data": "method.num_calibration", "ablation_time": "method.grid_step",
           "ablation_space": "table.space", "ablation_objective": "table.objective",
           "ablation_nv": "table.front_end"}[name]
    return pipeline_ablation(root, results, key)


def provenance(args: Any) -> str:
    import datetime

    from dop.evaluation.runner import checkpoint_hash
    from dop.results import git_sha

    title = args.title or f"{args.experiment} on the embedded default (tiny_llava)"
    lines = [f"# {title}", "",
             f"Generated by `python experiments/tables.py {args.experiment}"
             f"{' --root ' + ' '.join(map(str, args.root)) if args.root else ''} --results {args.results}` on "
             f"{datetime.date.today().isoformat()} (git {git_sha() or 'unknown'}; tiny_llava checkpoint "
             f"{checkpoint_hash('tiny_llava') or 'missing'}).", ""]
    if args.note:
        lines += [args.note, ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", choices=EXPERIMENTS)
    ap.add_argument("--root", type=Path, nargs="+",
                    help="the experiment's sweep dir(s) (default outputs/experiments/<name>)")
    ap.add_argument("--results", type=Path, default=Path("outputs/results"), help="the results store")
    ap.add_argument("--out", type=Path, help="also write the Markdown here (with a provenance header)")
    ap.add_argument("--title", default=None, help="heading of the written file")
    ap.add_argument("--note", default="", help="a paragraph under the heading (how it was run, caveats)")
    args = ap.parse_args(argv)
    roots = args.root or [Path("outputs/experiments") / args.experiment]
    if args.experiment in ("main_table", "latency"):
        text = by_method(roots, args.results)
    else:
        text = "\n\n".join(build(args.experiment, root, args.results) for root in roots)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(provenance(args) + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
