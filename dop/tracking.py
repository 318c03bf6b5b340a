"""W&B as a mirror of a run (the run dir and the results store stay the source of truth).

    with start_run(cfg, job_type="evaluate", run_dir=run_dir) as run:
        log_metrics(run, {"eval/synthetic/exact_match": 0.93})
        log_table(run, "eval/results", ["benchmark", "value"], [["synthetic", 0.93]])
        log_policy_heatmap(run, policy, num_layers=4, groups=["system", "vision", "instruction"])

``cfg.logger.name=none`` (or ``mode=disabled``) yields a ``NullRun`` with the same methods, so callers
never branch. ``mode=offline`` writes ``<run_dir>/wandb/offline-run-*`` and opens no connection.
The run is always finished, with a non-zero exit code when the block raised.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


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
    """A thin wrapper over ``wandb.Run`` that adds image/table helpers."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.summary = run.summary
        self.dir = run.dir
        self.id = run.id

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        self.run.log(dict(data), step=step)

    def log_image(self, key: str, image: Any, step: int | None = None) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(image) if isinstance(image, Path) else image)}, step=step)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _config_dict(cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            # hydra-only keys (${hydra:...}) cannot resolve outside a Hydra app: fall back to raw
            try:
                return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
            except Exception:
                return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]
    except ImportError:
        pass
    return dict(cfg) if isinstance(cfg, Mapping) else {}


_OUTER: list[Any] = []  # the run of an enclosing job (the pipeline): its stages log into it


@contextlib.contextmanager
def start_run(cfg: Any, job_type: str, run_dir: str | os.PathLike, name: str | None = None,
              outer: bool = False) -> Iterator[Any]:
    """A W&B run configured from ``cfg.logger`` (name, mode, project, entity, tags), always finished.

    With ``outer=True`` the run stays open for nested ``start_run`` calls (the stages of one
    pipeline job), which then log into it instead of starting runs of their own.
    """
    if _OUTER:
        yield _OUTER[-1]
        return
    logger = _get(cfg, "logger")
    kind = str(_get(logger, "name", "none"))
    mode = str(_get(logger, "mode", "offline"))
    if kind == "none" or mode == "disabled":
        yield NullRun()
        return
    if kind != "wandb":
        raise ValueError(f"unknown logger {kind!r}; known loggers: wandb, none")
    import wandb

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tags = _get(logger, "tags") or []
    run = wandb.init(
        project=_get(logger, "project", "dop"), entity=_get(logger, "entity"), mode=mode,  # type: ignore[arg-type]
        dir=str(run_dir), job_type=job_type, name=name, tags=list(tags), config=_config_dict(cfg),
        reinit="create_new",  # several stages in one process each get their own run
        # quiet by default: the run summary lives in the run dir; logger.verbose=true shows W&B's output
        settings=wandb.Settings(quiet=not bool(_get(logger, "verbose", False))),
    )
    wrapped = WandbRun(run)
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
    """Log numbers (non-numeric values are dropped: W&B charts only numbers); mirror them to summary."""
    nums = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if nums:
        run.log(nums, step=step)


def log_table(run: Any, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    run.log_table(key, columns, rows)


def policy_matrix(policy: Any, num_layers: int, groups: Iterable[str],
                  types: Sequence[str] = ("q", "kv", "mlp")):
    """A (num_layers, len(groups) * len(types)) 0/1 array: 1 where (layer, group, type) is pruned."""
    import numpy as np

    groups = list(groups)
    mat = np.zeros((num_layers, len(groups) * len(types)), dtype=np.float32)
    for layer in range(num_layers):
        for gi, g in enumerate(groups):
            for ti, t in enumerate(types):
                if policy is not None and policy.is_pruned(layer, g, t):
                    mat[layer, gi * len(types) + ti] = 1.0
    labels = [f"{g}/{t}" for g in groups for t in types]
    return mat, labels


def policy_heatmap(policy: Any, num_layers: int, groups: Iterable[str], path: str | os.PathLike) -> Path:
    """Save a PNG of layers x (group, type), dark = pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mat, labels = policy_matrix(policy, num_layers, groups)
    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(labels), 1 + 0.25 * num_layers))
    ax.imshow(mat, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("pruned operations", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_policy_heatmap(run: Any, policy: Any, num_layers: int, groups: Iterable[str],
                       key: str = "policy/heatmap", path: str | os.PathLike | None = None) -> Path | None:
    """Draw the policy heatmap (beside the run, or at ``path``) and log it as an image."""
    if path is None and isinstance(run, NullRun):
        return None  # nothing to log to and nowhere to put it
    if path is None:
        path = Path(run.dir or ".") / "policy_heatmap.png"
    png = policy_heatmap(policy, num_layers, groups, path)
    run.log_image(key, png)
    return png
