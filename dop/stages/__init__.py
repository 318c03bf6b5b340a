"""The stages: the only code that reads the Hydra config. Each stage turns the composed config into
its typed dataclass (``dop.stages.config``, strict) and calls the layers below; the pipeline calls
the other stages as functions.

May import everything below it (algorithms, engine, model access, concepts); only ``dop.cli``
imports it. Stage modules are loaded lazily through ``STAGES`` so ``dop --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from dop.errors import DopError
from dop.registry import Registry

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # the Hydra config tree (conf/)


class StageError(DopError, ValueError):
    """An unknown stage name."""


# stage name -> "module:function(cfg)"
STAGES = Registry("stage", {
    "pipeline": "dop.stages.pipeline:run",
    "train": "dop.stages.train:run",
    "sweep": "dop.stages.sweep:run",
    "merge": "dop.stages.sweep:run_merge",
    "search": "dop.stages.search:run",
    "evaluate": "dop.stages.evaluate:run",
    "report": "dop.stages.report:run",
    "bench": "dop.stages.bench:run",
    "compare": "dop.stages.compare:run",
}, error=StageError)

__all__ = ["CONF_DIR", "STAGES", "StageError"]
