"""The Hydra entry point ``dop``: composes conf/ and dispatches on ``stage`` (``dop.stages.STAGES``)."""

from __future__ import annotations

import logging
import os
import sys

# A quiet console: stage progress and results only. The per-request bars of lmms-eval, datasets and
# transformers go (tqdm reads TQDM_* once, when first imported: before the imports below), and so
# does W&B's banner; `hydra.verbose=true` keeps them.
if not any(a.startswith(("hydra.verbose", "--verbose")) for a in sys.argv[1:]):
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from dop.errors import DopError  # noqa: E402
from dop.stages import CONF_DIR, STAGES  # noqa: E402

log = logging.getLogger("dop")

# Libraries whose INFO chatter (device banners, tips) drowns dop's own step lines; `hydra.verbose`
# brings them back.
_CHATTY = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "datasets")


def resolve_stage(name: str):
    """The callable for a stage, or a one-line error listing the valid stages."""
    if name not in STAGES:
        raise SystemExit(f"dop: unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    return STAGES.get(name)


def one_line(err: BaseException) -> str:
    """An error's message on one line (Hydra's and OmegaConf's are multi-line)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def debug_requested(argv: list[str]) -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or any(a in ("debug=true", "debug=True", "+debug=true")
                                                            for a in argv)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _main(cfg: DictConfig):
    # after Hydra handled --help: Lightning sets its own log levels on import, ours come after
    import lightning.pytorch  # noqa: F401, PLC0415
    if not HydraConfig.get().verbose:
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return resolve_stage(str(cfg.stage))(cfg)
    except (DopError, OSError) as err:  # a user's error: one line (bugs keep their traceback)
        if cfg.get("debug") or debug_requested([]):
            raise
        log.debug("user error", exc_info=True)  # the traceback goes to the run's log file only
        print(f"dop: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


# --- checks before Hydra starts a run ---------------------------------------------------------
SLURM_PARTITION_KEY = "hydra.launcher.partition"
HELP_FLAGS = ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--shell-completion", "-sc")


def first_overrides(argv: list[str]) -> list[str]:
    """The command line's overrides with every sweep reduced to its first value (all cells of one
    multirun share the launcher, and the first cell stands for the others' config checks)."""
    parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-") and "=" in a])
    out = []
    for o in parsed:
        if o.is_sweep_override():
            try:
                first = next(iter(o.sweep_string_iterator()))
            except Exception:  # glob(...) needs the config loader: it cannot change the launcher  # noqa: BLE001
                continue
            out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(o.input_line)
    return out


def compose_argv(argv: list[str]) -> DictConfig:
    """The config the command line composes (first sweep values), with Hydra's own node."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=first_overrides(argv), return_hydra_config=True)


def check_launch(argv: list[str], cfg: DictConfig | None = None) -> str | None:
    """Why a multirun must not be submitted, or None: a SLURM launch (``launcher=slurm`` or
    ``hydra/launcher=submitit_slurm``) without a partition would queue nothing useful; say which key to
    set *before* Hydra builds the sweep. Only multiruns are checked (a single run never launches)."""
    if not is_multirun(argv):
        return None
    try:
        cfg = cfg if cfg is not None else compose_argv(argv)
    except Exception:  # let the config check (or Hydra) report composition errors  # noqa: BLE001
        return None
    launcher = cfg.hydra.launcher
    if "SlurmLauncher" not in str(launcher.get("_target_", "")):
        return None
    if OmegaConf.is_missing(launcher, "partition") or not launcher.get("partition"):
        return (f"SLURM launch refused before submitting: {SLURM_PARTITION_KEY} is not set. "
                f"Set it in conf/local/default.yaml (see conf/local/README.md) or pass "
                f"{SLURM_PARTITION_KEY}=<partition>.")
    return None


def is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv) or "hydra.mode=MULTIRUN" in argv


def writable_dir(path: str | Path) -> str | None:
    """Why ``path`` cannot be created or written as a directory, or None."""
    p = Path(path).expanduser().absolute()
    existing = next((q for q in (p, *p.parents) if q.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{p} cannot be created ({existing} is not a directory)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{p} is not writable ({existing} is read-only for this user)"
    return None


def preflight(argv: list[str]) -> str | None:
    """Everything that can be checked before Hydra starts a run, as one line, or None: the stage
    name, the composition of the command line's overrides, the SLURM partition, the typed config
    of the stage (keys, types, choices, budgets), and that the run and results directories can be
    written. A bad config then never leaves a run directory behind or loads a model."""
    for arg in argv:
        if arg.startswith("stage="):
            name = arg.split("=", 1)[1]
            if name not in STAGES and "," not in name:
                return f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}"
    try:
        cfg = compose_argv(argv)
    except Exception as err:  # Hydra's composition errors (unknown option, bad override syntax)  # noqa: BLE001
        return one_line(err)
    launch = check_launch(argv, cfg)
    if launch:
        return launch
    stage = str(cfg.stage)
    if stage not in STAGES:
        return f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}"
    run_dir = None if is_multirun(argv) else str(cfg.hydra.run.dir)
    if run_dir is not None:
        why = writable_dir(run_dir)
        if why:
            return f"run directory (hydra.run.dir): {why}"
    # the typed configs pull in torch and transformers: loaded here, never for `dop --help`
    from dop.stages.config import STAGE_SCHEMAS, load  # noqa: PLC0415

    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.set_struct(job, False)
    job.paths.run_dir = run_dir or str(cfg.hydra.sweep.dir)  # ${hydra:runtime.output_dir} has no value yet
    try:
        conf = load(STAGE_SCHEMAS[stage], job)
    except (DopError, OmegaConfBaseException) as err:
        return one_line(err)
    model = getattr(conf, "model", None)
    if model is not None:
        try:
            model.check_checkpoint()
        except DopError as err:
            return one_line(err)
    if stage in ("evaluate", "pipeline"):  # records: a read-only store would lose the evaluations
        why = writable_dir(conf.paths.results_dir)
        if why:
            return f"results store (paths.results_dir): {why}"
    return None


def main() -> None:
    argv = sys.argv[1:]
    if not any(a in HELP_FLAGS or a.startswith("--cfg") for a in argv):
        try:
            error = preflight(argv)
        except Exception:  # a bug in the checks must not block a run: Hydra and the stage still check  # noqa: BLE001
            if debug_requested(argv):
                raise
            error = None
        if error:
            print(f"dop: {error}", file=sys.stderr)
            raise SystemExit(2)
    _main()


if __name__ == "__main__":
    main()
