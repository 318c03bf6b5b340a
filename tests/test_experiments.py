"""Every paper-table experiment (conf/experiment/*.yaml) composes and runs on the embedded tiny model;
launches through Hydra's submitit launcher resume by cell; SLURM without a partition is refused.

Fast tier (~1 min on 2 shared CPU cores): compose every experiment and every value of its sweep,
smoke-run each experiment's default cell and each baseline's main-table cell on tiny_llava with a
handful of samples (baselines that do not import yet are skipped), the unknown-experiment and
SLURM-partition errors. ``slow`` (DOP_RUN_SLOW=1, ~3 min): a 4-job submitit_local multirun with a
failed cell redone by resubmission, and a 4-shard sweep through the launcher + merge compared with
the single-process sweep.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dop.cli import CONF_DIR, SLURM_PARTITION_KEY, check_launch, resolve_stage
from dop.models import TINY_LLAVA_DIR

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
needs_tiny = pytest.mark.skipif(not (TINY_LLAVA_DIR / "config.json").exists(), reason="tiny_llava not shipped")
ROOT = Path(CONF_DIR).parent


def _in_defaults(group: str) -> bool:
    """conf/config.yaml lists the group (then `group=x`), else it must be appended (`+group=x`)."""
    defaults = OmegaConf.load(Path(CONF_DIR) / "config.yaml").get("defaults", [])
    return any(OmegaConf.is_dict(d) and any(str(k).split(" ")[-1] == group for k in d) for d in defaults)


def sel(group: str, choice: str) -> str:
    return f"{group}={choice}" if _in_defaults(group) else f"+{group}={choice}"


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def _sweep_params(name: str) -> dict[str, list[str]]:
    cfg = _compose(sel("experiment", name), hydra=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) or {}
    parser = OverridesParser.create()
    out = {}
    for key, value in params.items():
        (ov,) = parser.parse_overrides([f"{key}={value}"])
        out[key] = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [str(value)]
    return out


# --- every experiment composes, with an honest header -------------------------------------------------
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_header(name):
    text = (Path(CONF_DIR) / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    for field in ("Run:", "Produces:", "Cost:", f"experiment={name}"):
        assert field in text, f"{name}.yaml header lacks {field!r}"
    assert "COST_" not in text, "paste scripts/estimate_cost.py output into the header"
    assert "GPU-hours" in text
    cfg = _compose(sel("experiment", name), hydra=True)
    assert cfg.table.name == name
    assert str(cfg.hydra.sweep.dir).endswith(f"experiments/{name}") or "${" in str(cfg.hydra.sweep.dir)
    OmegaConf.to_container(cfg.budget, resolve=True)
    assert cfg.stage  # resolves (main_table / latency pick the stage from the method)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_sweep_value_composes(name):
    """Each value of the experiment's grid composes (a missing method/model config fails here)."""
    params = _sweep_params(name)
    assert params, f"{name} has no hydra.sweeper.params grid"
    for key, values in params.items():
        for value in values:
            cfg = _compose(sel("experiment", name), f"{key}={value}", "paths.run_dir=/tmp/unused")
            OmegaConf.to_container(cfg.budget, resolve=True)
            assert cfg.stage in ("pipeline", "evaluate", "search")


# --- smoke runs on the tiny model -------------------------------------------------------------------------
TINY = ["model=tiny_llava", "benchmark=synthetic", "benchmark.limit=4", "benchmark.batch_size=4", "logger=none",
        "data.sizes.train=8", "data.sizes.val=8", "data.sizes.test=8", "budget.kind=ratio", "budget.values=[0.5]",
        "sweep.progress_bar=false", "num_threads=1", "device=cpu"]
DOP_TINY = ["method.num_calibration=2", "method.grid_step=3"]
SMOKE_EXTRA = {"ablation_additive": ["method.check_additive=6"], "ablation_data": ["method.num_calibration=2"],
               "ablation_time": ["method.grid_step=3", "method.num_calibration=2"],
               # dop_paper prunes only visual operations: on the tiny model (16 of ~60 prompt tokens visual)
               # no policy reaches 0.5 of dense
               "main_table": ["budget.values=[0.8]"], "main_table_search": ["budget.values=[0.8]"],
               "latency": ["budget.values=[0.8]"]}


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="session")
def smoke_runs(smoke_root):
    """name -> (cfg, output, run dir); a shared results store, so dense is evaluated once."""
    cache: dict[str, tuple] = {}

    def run(name: str, *extra: str, key: str | None = None):
        key = key or name
        if key not in cache:
            run_dir = smoke_root / "runs" / key
            dop = [] if any(e.startswith("method=") for e in extra) else DOP_TINY
            overrides = [sel("experiment", name), *TINY, *dop, *SMOKE_EXTRA.get(name, []),
                         f"paths.output_dir={smoke_root / 'out'}", f"paths.run_dir={run_dir}",
                         f"data.path={smoke_root / 'data'}", *extra]
            cfg = _compose(*overrides)
            cache[key] = (cfg, resolve_stage(str(cfg.stage))(cfg), run_dir)
        return cache[key]

    return run


def _records(smoke_root, **where):
    from dop.results import ResultsStore

    return ResultsStore(smoke_root / "out" / "results").records(**where)


@needs_tiny
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_smoke_runs_on_tiny(name, smoke_runs, smoke_root):
    if name == "ablation_transfer":
        _, _, source = smoke_runs("ablation_additive")  # a search: its policies/ are the source
        smoke_runs(name, f"table.source_run={source}")
        _assert_policies_recorded(smoke_root, source)
        return
    cfg, out, run_dir = smoke_runs(name)  # the default cell (ablation_objective: dop)
    if name == "main_table_search":  # one search, in the search store, linked into the run dir
        search = json.loads((run_dir / "search.json").read_text())
        assert (run_dir / "policies").is_symlink() and (run_dir / "policies" / "ratio_0.8.yaml").is_file()
        assert search["calibration"]["kind"] == "synthetic" and search["n_v"]["reducer"] == "vispruner"
        return
    if cfg.stage == "search":
        search = json.loads((run_dir / "search.json").read_text())
        check = search["additive_check"]
        assert check["n"] == 6 and -1 <= check["spearman"] <= 1 and len(check["points"]) == 6
        assert (run_dir / "policies" / "ratio_0.5.yaml").is_file()
    else:
        assert (run_dir / "result.json").is_file() and (run_dir / "search.json").is_file()
        # records land in the store (or were there: an equal cell of another experiment is skipped)
        _assert_policies_recorded(smoke_root, run_dir)
        assert any(r.method == "dense" for r in _records(smoke_root))


def _assert_policies_recorded(smoke_root, run_dir):
    from dop.policy import Policy

    hashes = {r.policy_hash for m in ("dop", "dop_paper") for r in _records(smoke_root, method=m)}
    files = sorted((run_dir / "policies").glob("*.yaml"))
    assert files and all(Policy.from_yaml(f).digest() in hashes for f in files)


@needs_tiny
def test_ablation_space_variants_are_the_stated_spaces(smoke_runs):
    """tied and token-level spaces search fewer parameters than the decoupled one."""
    sizes = {}
    for space in ("decoupled", "tied", "token"):
        cfg = _compose(sel("experiment", "ablation_space"), f"table.space={space}", "paths.run_dir=/tmp/unused")
        sizes[space] = list(cfg.method.types)
    assert sizes == {"decoupled": ["q", "kv", "mlp"], "tied": ["attn", "mlp"], "token": ["kv"]}


@pytest.mark.parametrize("objective,solver", [("kl_greedy", "greedy"), ("gsop", "greedy")])
def test_ablation_objective_variants(objective, solver):
    cfg = _compose(sel("experiment", "ablation_objective"), f"table.objective={objective}", "paths.run_dir=/tmp/u")
    assert cfg.method.solver == solver
    assert cfg.method.objective == ("accuracy" if objective == "gsop" else "kl")


BASELINES = ["fastv", "pdrop", "sparsevlm", "visionzip", "prumerge_plus", "trim", "dart", "divprune", "fastervlm",
             "vispruner", "cdpruner", "vtw"]


def _baseline_or_skip(method: str):
    """Every main-table baseline is registered, imports, and has its conf/method file."""
    from dop.engine.baselines import METHODS

    assert method in METHODS, f"{method} is not registered in dop.engine.baselines"
    METHODS.get(method)  # imports its module
    assert (Path(CONF_DIR) / "method" / f"{method}.yaml").is_file(), f"conf/method/{method}.yaml is missing"


@needs_tiny
@pytest.mark.parametrize("method", BASELINES)
def test_main_table_baseline_cell_on_tiny(method, smoke_runs, smoke_root):
    """A baseline cell of the main table: the evaluate stage at the budget, records under its name."""
    _baseline_or_skip(method)
    from dop.engine.baselines import MethodError

    # budget 0.8: e.g. FastV (K=2) cannot go below ~0.70 of dense on the 6-layer tiny model
    try:
        cfg, out, _ = smoke_runs("main_table", f"method={method}", "budget.values=[0.8]", key=f"main_table_{method}")
    except MethodError as err:  # the method's own check_model: e.g. TRIM/CDPruner need a CLIP text tower
        if " needs " not in str(err):
            raise
        pytest.skip(f"{method} cannot run on tiny_llava: {str(err)[:120]}")
    assert cfg.stage == "evaluate"
    assert out["records"] and {r["method"] for r in out["records"]} == {method}


# --- CLI errors -------------------------------------------------------------------------------------------
def _dop(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "dop.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=timeout)


def test_unknown_experiment_lists_the_known_ones(tmp_path):
    res = _dop(sel("experiment", "nope"), f"hydra.run.dir={tmp_path}")
    assert res.returncode != 0
    assert "Could not find 'experiment/nope'" in res.stderr
    for name in EXPERIMENTS:
        assert name in res.stderr


def test_slurm_without_partition_fails_before_submitting(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", sel("experiment", "ablation_additive"), sel("launcher", "slurm"), f"hydra.sweep.dir={sweep_dir}"]
    assert SLURM_PARTITION_KEY in (check_launch(args) or "")
    res = _dop(*args)
    assert res.returncode == 2
    assert SLURM_PARTITION_KEY in res.stderr and "conf/local/default.yaml" in res.stderr
    assert not sweep_dir.exists()  # nothing was set up, let alone submitted
    # Hydra's own launcher name is checked too, and a partition lets the launch through
    assert check_launch(["-m", "hydra/launcher=submitit_slurm", "model=tiny_llava,llava15_7b"])
    assert check_launch([*args, f"{SLURM_PARTITION_KEY}=gpu"]) is None
    assert check_launch([sel("experiment", "ablation_additive"), sel("launcher", "slurm")]) is None  # single run
    assert check_launch(["-m", sel("launcher", "local"), "model=tiny_llava,llava15_7b"]) is None


def test_launcher_configs_set_one_gpu_per_job_and_array_parallelism():
    cfg = _compose(sel("launcher", "slurm"), f"{SLURM_PARTITION_KEY}=gpu", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1
    assert launcher.array_parallelism > 0 and launcher.timeout_min > 0 and launcher.partition == "gpu"
    local = _compose(sel("launcher", "local"), hydra=True).hydra.launcher
    assert local._target_.endswith("LocalLauncher")


# --- through the submitit_local launcher ------------------------------------------------------------------
def _write_source_policies(root: Path, source: str, depth: int) -> None:
    from dop.policy import DepthPolicy

    pdir = root / "out" / "experiments" / "main_table" / source / "dop_paper" / "synthetic" / "policies"
    pdir.mkdir(parents=True, exist_ok=True)
    DepthPolicy({("kv", "vision"): depth, ("q", "vision"): depth, ("mlp", "vision"): depth}).expand(6).to_yaml(
        pdir / "ratio_0.5.yaml")


def _launch_transfer(root: Path, sources: list[str]) -> subprocess.CompletedProcess:
    return _dop("-m", sel("experiment", "ablation_transfer"), sel("launcher", "local"), "model=tiny_llava",
                "benchmark=synthetic", "benchmark.limit=4", "benchmark.batch_size=4", "logger=none",
                f"paths.output_dir={root / 'out'}", f"data.path={root / 'data'}", "data.sizes.train=8",
                "data.sizes.val=8", "data.sizes.test=8", "num_threads=1", "device=cpu",
                "table.source_benchmark=synthetic", f"table.source_model={','.join(sources)}")


@needs_tiny
@pytest.mark.slow
def test_submitit_local_multirun_lands_every_cell_and_resubmit_redoes_only_the_missing(tmp_path):
    from dop.results import ResultsStore

    sources = ["s1", "s2", "s3", "s4"]
    for i, s in enumerate(sources[:3]):  # s4's source policies are missing: its job dies
        _write_source_policies(tmp_path, s, depth=1 + i)
    first = _launch_transfer(tmp_path, sources)
    assert first.returncode != 0  # the multirun reports the dead cell
    store = ResultsStore(tmp_path / "out" / "results")
    before = {r.record_id: r for r in store.records()}
    assert len(before) == 3 and {Path(r.extra["policy_path"]).parts[-5] for r in before.values()} == set(sources[:3])
    _write_source_policies(tmp_path, "s4", depth=4)
    second = _launch_transfer(tmp_path, sources)
    assert second.returncode == 0, second.stderr[-3000:]
    after = {r.record_id: r for r in store.records()}
    assert len(after) == 4 and set(before) <= set(after)  # the 3 done cells were not redone
    (new,) = [r for k, r in after.items() if k not in before]
    assert Path(new.extra["policy_path"]).parts[-5] == "s4"
    logs = list((tmp_path / "out" / "experiments" / "ablation_transfer").rglob("*.log"))
    assert sum("already in the store" in p.read_text() for p in logs) >= 3


@needs_tiny
@pytest.mark.slow
def test_four_shards_through_the_launcher_then_merge_equal_one_sweep(tmp_path):
    from dop.sweep import SweepStore

    common = ["model=tiny_llava", "logger=none", "method.num_calibration=4", "sweep.progress_bar=false",
              "num_threads=1", "device=cpu", f"paths.output_dir={tmp_path / 'out'}", f"data.path={tmp_path / 'data'}",
              "data.sizes.train=8", "data.sizes.val=8", "data.sizes.test=8"]
    shards = tmp_path / "shards"
    res = _dop("-m", "stage=sweep", sel("launcher", "local"), "sweep.shard=range(4)", "sweep.num_shards=4",
               *common, f"hydra.sweep.dir={shards}", "hydra.sweep.subdir=${sweep.shard}")
    assert res.returncode == 0, res.stderr[-3000:]
    merged = tmp_path / "merged"
    res = _dop("stage=merge", *common, f"sweep.merge_from=[{','.join(str(shards / str(k)) for k in range(4))}]",
               f"hydra.run.dir={merged}")
    assert res.returncode == 0, res.stderr[-3000:]
    single = tmp_path / "single"
    res = _dop("stage=sweep", *common, f"hydra.run.dir={single}")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = SweepStore(merged / "sweep"), SweepStore(single / "sweep")
    fp = b.meta()["fingerprint"]
    assert a.meta()["fingerprint"] == fp
    pa, pb = sorted(a.points()), sorted(b.points())
    assert pa == pb and len(pa) > 0
    for p in pa:
        ka, kb = a.read(p, fp)["kl"], b.read(p, fp)["kl"]
        assert abs(ka - kb) <= 1e-6 * max(1.0, abs(kb)), (p, ka, kb)
    assert json.loads((merged / "sweep" / "merge.json").read_text())["complete"]
    for k in range(4):  # every shard did a quarter of the points
        assert (shards / str(k) / "sweep" / "shards" / f"{k}_of_4.json").is_file()


def test_estimate_cost_script_runs():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        est = importlib.import_module("estimate_cost")
    finally:
        sys.path.pop(0)
    tp = est.Throughput()
    for name in est.EXPERIMENTS:
        e = est.estimate(name, tp)
        assert e.jobs > 0 and e.cost.flops > 0 and e.cost.seconds > 0
    assert set(est.EXPERIMENTS) == set(EXPERIMENTS)
    # the pinned paper number: LLaVA-1.5-7B dense decoder prefill at 35 + 576 + 100 tokens is 9.47 T
    assert abs(est.decoder_prefill(est.MODELS["llava15_7b"], 100) / 1e12 - 9.47) < 0.01
    # headers quote the script's GPU-hours
    for name in EXPERIMENTS:
        text = (Path(CONF_DIR) / "experiment" / f"{name}.yaml").read_text()
        hours = f"{est.estimate(name, tp).cost.seconds / 3600:,.1f} GPU-hours"
        assert hours in text, f"{name}.yaml: expected {hours!r} (rerun scripts/estimate_cost.py)"


def test_experiments_readme_lists_every_experiment():
    readme = (ROOT / "experiments" / "README.md").read_text()
    for name in EXPERIMENTS:
        assert re.search(rf"experiment={name}\b", readme), name
