"""The search store: one search per (model, calibration set, search space, budgets), shared by every
benchmark cell of an experiment and reused by every rerun.

    <sweep.store>/<model>/sweep-<key>/              key: model, data, search space, seed (what the sweep measures)
        sweep/                                      the divergence sweep (shared by every budget set)
        search-<solve key>/                         solve key: objective, solver, convention, budgets
            policies/<budget>.yaml, search.json     what every benchmark cell evaluates
            store.json                              the identity both keys digest

The first stage that needs a search computes it under a file lock on ``sweep-<key>/.lock``; the
others wait, then read it (on SLURM, ``experiment=main_table_search`` runs the searches first, see
experiments/README.md). The stage's run dir links to it: ``<run>/policies`` and ``<run>/search.json``
are symlinks into the store. ``sweep.run_dir`` set explicitly, or ``sweep.store=null``, keeps the
search in that directory instead (a private search, as before the store).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dop.io import atomic_write_json
from dop.stages.config import SearchStage
from dop.stages.schema import ConfigError

log = logging.getLogger("dop.store")

# method fields that shape the sweep (the rest only shape the solve)
SWEEP_METHOD_KEYS = ("groups", "types", "pairs", "grid_step", "response_tokens", "num_calibration", "n_v", "reducer")
SOLVE_METHOD_KEYS = ("objective", "solver", "convention", "flops_groups", "interpolation", "measure",
                     "check_additive", "accuracy_max_new_tokens")
_NOT_IDENTITY = ("allow_overlap",)  # data keys that change no result
_MODEL_NOT_IDENTITY = ("budgets",)  # model keys the search does not read (budget=model resolves into budget)


def _digest(doc: Any, n: int) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:n]


def identity(conf: SearchStage) -> dict[str, Any]:
    """What the search depends on: ``sweep`` (model, data, space, seed) and ``solve`` (objective,
    solver, FLOPs convention, budgets)."""
    method = dataclasses.asdict(conf.method)
    data = {k: v for k, v in dataclasses.asdict(conf.data).items() if k not in _NOT_IDENTITY}
    data["kind"] = conf.data.kind
    model = {k: v for k, v in dataclasses.asdict(conf.model).items() if k not in _MODEL_NOT_IDENTITY}
    return {"sweep": {"model": model, "data": data, "seed": conf.seed,
                      "method": {k: method[k] for k in SWEEP_METHOD_KEYS}},
            "solve": {"method": {k: method[k] for k in SOLVE_METHOD_KEYS},
                      "budget": {"kind": conf.budget.kind, "values": list(conf.budget.values)}}}


@dataclass(frozen=True)
class SearchLocation:
    """Where one search lives and how it is shared."""

    search_dir: Path  # policies/, search.json (the job's run dir)
    sweep_dir: Path | None  # the sweep store (None: <search_dir>/sweep)
    lock_dir: Path | None  # the sweep-key folder that is locked (None: a private search)
    identity: dict[str, Any] | None = None

    @property
    def shared(self) -> bool:
        return self.lock_dir is not None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive while the search is checked and computed (a no-op for a private search)."""
        if self.lock_dir is None:
            yield
            return
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_dir / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("search %s is being computed by another job; waiting for it", self.search_dir)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def done(self, conf: SearchStage) -> dict[str, Any] | None:
        """The stored search (search.json) when it holds a policy for every budget, else None."""
        path = self.search_dir / "search.json"
        if not self.shared or not path.is_file():
            return None
        found = json.loads(path.read_text())
        budgets = found.get("budgets", {})
        if all(b.name in budgets and Path(budgets[b.name].get("policy") or "").is_file() for b in conf.budgets):
            return found
        return None

    def write_identity(self) -> None:
        if self.identity is not None:
            atomic_write_json(self.search_dir / "store.json", self.identity, indent=2, default=str)

    def link(self, run_dir: str | os.PathLike) -> None:
        """``<run>/policies`` and ``<run>/search.json`` as symlinks into the store."""
        run = Path(run_dir)
        if not self.shared or run.resolve() == self.search_dir.resolve():
            return
        run.mkdir(parents=True, exist_ok=True)
        for name in ("policies", "search.json"):
            # relative to the link's own folder (a path relative to the cwd, e.g. under the default
            # paths.output_dir=outputs, would dangle); the outputs tree can still move as a whole
            link = run / name
            target = Path(os.path.relpath((self.search_dir / name).resolve(), run.resolve()))
            if link.is_symlink():
                if Path(os.readlink(link)) == target:
                    continue
                link.unlink()
            elif link.exists():
                raise ConfigError(f"run directory {run} holds a search of its own ({name}); the search now lives "
                                  f"in the store ({self.search_dir}): remove {link} or pass hydra.run.dir=<new dir>")
            link.symlink_to(target, target_is_directory=name == "policies")


def location(conf: SearchStage) -> SearchLocation:
    """Where the search of ``conf`` lives: ``sweep.run_dir`` when set (private), else the store
    (``sweep.store``), else the stage's run dir (private)."""
    sweep_dir = Path(conf.sweep.dir) if conf.sweep.dir else None
    if conf.sweep.run_dir or not conf.sweep.store:
        return SearchLocation(Path(conf.sweep.run_dir or conf.paths.run_dir), sweep_dir, None)
    ident = identity(conf)
    key_dir = Path(conf.sweep.store) / conf.model.name / f"sweep-{_digest(ident['sweep'], 12)}"
    search_dir = key_dir / f"search-{_digest(ident['solve'], 8)}"
    return SearchLocation(search_dir, sweep_dir or key_dir / "sweep", key_dir, ident)
