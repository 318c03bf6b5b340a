"""The Hydra entry point ``dop``: composes conf/ and dispatches on ``stage`` (``dop.stages.STAGES``)."""

from __future__ import annotations

import logging
import sys

import hydra
import lightning.pytorch  # noqa: F401  (it sets its own log levels on import; ours come after)
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from dop.stages import CONF_DIR, STAGES

log = logging.getLogger("dop")

# Libraries whose INFO chatter (device banners, tips) drowns dop's own step lines; `hydra.verbose`
# brings them back.
_CHATTY = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "datasets")


def resolve_stage(name: str):
    """The callable for a stage, or a one-line error listing the valid stages."""
    if name not in STAGES:
        raise SystemExit(f"dop: unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    return STAGES.get(name)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _main(cfg: DictConfig):
    if not HydraConfig.get().verbose:
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    return resolve_stage(str(cfg.stage))(cfg)


# --- launch check (issue 10) -----------------------------------------------------------------
SLURM_PARTITION_KEY = "hydra.launcher.partition"


def check_launch(argv: list[str]) -> str | None:
    """Why a multirun must not be submitted, or None.

    A SLURM launch (``launcher=slurm`` or ``hydra/launcher=submitit_slurm``) without a partition
    would queue nothing useful; say which key to set *before* Hydra builds the sweep. Only
    multiruns are checked (a single run never uses the launcher). Sweep overrides are reduced to
    their first value: every cell of one multirun shares its launcher config.
    """
    if not any(a in ("-m", "--multirun") for a in argv) and "hydra.mode=MULTIRUN" not in argv:
        return None
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-") and "=" in a])
    except Exception:  # let Hydra itself report malformed overrides
        return None
    overrides = []
    for o in parsed:
        if o.is_sweep_override():
            try:
                first = next(iter(o.sweep_string_iterator()))
            except Exception:  # glob(...) needs the config loader: it cannot change the launcher
                continue
            overrides.append(f"{o.get_key_element()}={first}")
        else:
            overrides.append(o.input_line)
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except Exception:  # let Hydra itself report composition errors
        return None
    launcher = cfg.hydra.launcher
    if "SlurmLauncher" not in str(launcher.get("_target_", "")):
        return None
    if OmegaConf.is_missing(launcher, "partition") or not launcher.get("partition"):
        return (f"dop: SLURM launch refused before submitting: {SLURM_PARTITION_KEY} is not set. "
                f"Set it in conf/local/default.yaml (see conf/local/README.md) or pass "
                f"{SLURM_PARTITION_KEY}=<partition>.")
    return None


def main() -> None:
    launch_error = check_launch(sys.argv[1:])
    if launch_error:
        print(launch_error, file=sys.stderr)
        raise SystemExit(2)
    # Bad stage names fail before Hydra sets up a run directory.
    for arg in sys.argv[1:]:
        if arg.startswith("stage="):
            name = arg.split("=", 1)[1]
            if name not in STAGES:
                print(f"dop: unknown stage {name!r}; valid stages: {', '.join(STAGES)}", file=sys.stderr)
                raise SystemExit(2)
    _main()


if __name__ == "__main__":
    main()
