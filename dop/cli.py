"""The Hydra entry point ``dop``: composes conf/ and dispatches on ``stage``."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# stage name -> "module:function(cfg)"; imported lazily so `dop --help` stays fast.
STAGES: dict[str, str] = {
    "pipeline": "dop.pipeline:run",
    "train": "dop.train:run",
    "sweep": "dop.sweep:run",
    "merge": "dop.sweep:run_merge",
    "search": "dop.search:run",
    "evaluate": "dop.evaluation.stage:run",
    "report": "dop.report:run",
    "bench": "dop.bench:run",
}

log = logging.getLogger("dop")


def resolve_stage(name: str):
    """The callable for a stage, or a one-line error listing the valid stages."""
    if name not in STAGES:
        raise SystemExit(f"dop: unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _main(cfg: DictConfig):
    return resolve_stage(str(cfg.stage))(cfg)


def main() -> None:
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
