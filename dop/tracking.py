"""W&B as a mirror of a run (the run dir and the results store stay the source of truth).

    with start_run(LoggerConfig(...), job_type="evaluate", run_dir=run_dir, config=resolved) as run:
        log_metrics(run, {"eval/synthetic/exact_match": 0.93})
        log_table(run, "eval/results", ["benchmark", "value"], [["synthetic", 0.93]])
        run.log_image("search/ratio_0.5/policy", png_path)

``logger.name=none`` (or ``mode=disabled``) yields a ``NullRun`` with the same methods, so callers
never branch. ``mode=offline`` writes ``<run_dir>/wandb/offline-run-*`` and opens no connection.
The run is always finished, with a non-zero exit code when the block raised. A mirror never fails
the job: a W&B error while logging is reported once as a warning and the run goes on without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("dop.tracking")


@dataclass
class LoggerConfig:
    """``conf/logger``: where a run is mirrored."""

    name: Literal["wandb", "none"]
    mode: Literal["online", "offline", "disabled"]
    project: str
    entity: str | None
    tags: list[str] = field(default_factory=list)
    verbose: bool = False  # W&B's own console output (run banner, summary)


class NullRun:
    """The no-op run: same methods as ``WandbRun``, records nothing."""

    dir: str | None = None
    id: str | None = None

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def log_image(self, key: str, image: Any, step: int | None = None) -> None:
        pass

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbRun:
    """A thin wrapper over ``wandb.Run`` that adds image/table helpers; logging errors are warned
    about once and then ignored (the mirror must not fail the job)."""

    def __init__(self, run: Any, wandb: Any) -> None:
        self.run, self._wandb = run, wandb
        self.summary = run.summary
        self.dir = run.dir
        self.id = run.id
        self._failed = False

    def _safely(self, what: str, fn: Any, always: bool = False) -> None:
        if self._failed and not always:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - any W&B failure: keep the job, drop the mirror
            self._failed = True
            log.warning("W&B mirror stopped (%s failed: %s); the run directory keeps everything", what, err)

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        self._safely("log", lambda: self.run.log(dict(data), step=step))

    def log_image(self, key: str, image: Any, step: int | None = None) -> None:
        self._safely("log_image", lambda: self.run.log(
            {key: self._wandb.Image(str(image) if isinstance(image, Path) else image)}, step=step))

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self._safely("log_table", lambda: self.run.log(
            {key: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])}))

    def finish(self, exit_code: int = 0) -> None:
        self._safely("finish", lambda: self.run.finish(exit_code=exit_code), always=True)


_OUTER: list[Any] = []  # the run of an enclosing job (the pipeline): its stages log into it


@contextlib.contextmanager
def start_run(logger: LoggerConfig, job_type: str, run_dir: str | os.PathLike, config: Mapping[str, Any] | None = None,
              name: str | None = None, outer: bool = False) -> Iterator[Any]:
    """A W&B run configured by ``logger`` (mode, project, entity, tags), always finished.

    ``config`` is the resolved configuration shown on the run. With ``outer=True`` the run stays
    open for nested ``start_run`` calls (the stages of one pipeline job), which then log into it
    instead of starting runs of their own.
    """
    if _OUTER:
        yield _OUTER[-1]
        return
    if logger.name == "none" or logger.mode == "disabled":
        yield NullRun()
        return
    import wandb  # noqa: PLC0415 - optional heavy dependency: only a W&B-mirrored run pays its import

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=logger.project, entity=logger.entity, mode=logger.mode, dir=str(run_dir), job_type=job_type,
        name=name, tags=list(logger.tags), config=dict(config or {}),
        reinit="create_new",  # several stages in one process each get their own run
        settings=wandb.Settings(quiet=not logger.verbose),
    )
    wrapped = WandbRun(run, wandb)
    if outer:
        _OUTER.append(wrapped)
    try:
        yield wrapped
    except BaseException:
        wrapped.finish(exit_code=1)
        raise
    else:
        wrapped.finish(exit_code=0)
    finally:
        if outer:
            _OUTER.remove(wrapped)


def log_metrics(run: Any, metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log numbers (non-numeric values are dropped: W&B charts only numbers)."""
    nums = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if nums:
        run.log(nums, step=step)


def log_table(run: Any, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    run.log_table(key, columns, rows)
