"""Evaluation: the lmms-eval plugin ``dop``, local tasks (dop's synthetic one, and lmms-eval's tasks on
local copies of their datasets), fixtures of the 13 benchmarks, the benchmark registry and the evaluate stage.

Submodules are imported lazily (``dop.evaluation.plugin`` imports lmms-eval, which is slow to load).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DopLMM", "benchmark_tasks", "resolve", "score_synthetic", "write_local_task", "write_task_dir"]

_LAZY = {
    "DopLMM": "dop.evaluation.plugin",
    "benchmark_tasks": "dop.evaluation.local_tasks",
    "write_local_task": "dop.evaluation.local_tasks",
    "resolve": "dop.evaluation.benchmarks",
    "score_synthetic": "dop.evaluation.scoring",
    "write_task_dir": "dop.evaluation.tasks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dop.evaluation' has no attribute {name!r}")
