"""The results store: one JSON file per evaluation record, written atomically.

    store = ResultsStore("outputs/results")
    store.append(Record(model="tiny_llava", method="dense", benchmark="synthetic",
                        metric="exact_match", value=0.93))   # -> outputs/results/<record-id>.json
    store.records(method="dense")                           # every matching Record
    store.exists(record.key)                                # skip a cell that is already done

Each record is written to a temporary file in the store directory and renamed (``os.replace`` is
atomic on POSIX filesystems, shared cluster ones included), and record ids are unique, so any number
of jobs can append at once without locks. ``report`` reads only this store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from dop.errors import DopError
from dop.io import atomic_write_json

log = logging.getLogger(__name__)


class RecordError(DopError, ValueError):
    """A document that is not a valid results record (the message names the field)."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class CellKey(NamedTuple):
    """What one table cell is: a model under a method/policy at a budget, on a benchmark metric."""

    model: str
    method: str
    policy_hash: str | None
    budget_kind: str | None
    budget_value: float | None
    benchmark: str
    metric: str


@dataclass
class Record:
    model: str
    method: str
    benchmark: str
    metric: str
    value: float
    model_revision: str | None = None  # hub revision or a hash of the checkpoint
    policy_hash: str | None = None  # Policy.digest(); None for dense
    budget_kind: str | None = None  # ratio | tflops | tokens; None for dense
    budget_value: float | None = None
    tflops: float | None = None  # prefill TFLOPs, the mean over the evaluated samples (dop convention)
    equivalent_tokens: float | None = None  # visual tokens kept in every layer at the same FLOPs
    samples: int | None = None
    prefill_latency_s: float | None = None
    total_latency_s: float | None = None
    peak_memory_bytes: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    task_config_hash: str | None = None
    git_sha: str | None = None
    timestamp: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)
    record_id: str | None = None  # assigned by ResultsStore.append

    @property
    def budget(self) -> tuple[str | None, float | None]:
        return (self.budget_kind, self.budget_value)

    @property
    def key(self) -> CellKey:
        return CellKey(self.model, self.method, self.policy_hash, self.budget_kind,
                       None if self.budget_value is None else float(self.budget_value),
                       self.benchmark, self.metric)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> Record:
        """Raise ``RecordError`` naming the first field whose value does not fit the schema."""
        for name in ("model", "method", "benchmark", "metric"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RecordError(f"record field {name!r} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("value", "timestamp"):
            if not _is_number(getattr(self, name)):
                raise RecordError(f"record field {name!r} must be a number, got {getattr(self, name)!r}")
        for name in ("budget_value", "tflops", "equivalent_tokens", "prefill_latency_s", "total_latency_s"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise RecordError(f"record field {name!r} must be a number or null, got {value!r}")
        for name in ("samples", "peak_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise RecordError(f"record field {name!r} must be an integer or null, got {value!r}")
        for name in ("versions", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise RecordError(f"record field {name!r} must be a mapping, got {type(getattr(self, name)).__name__}")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        """A checked record from its JSON document (``RecordError`` if it is not one)."""
        if not isinstance(d, dict):
            raise RecordError(f"a record is a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        rest = {k: v for k, v in d.items() if k not in names}
        missing = sorted({"model", "method", "benchmark", "metric", "value"} - set(known))
        if missing:
            raise RecordError(f"record lacks field {missing[0]!r}")
        rec = cls(**known)
        if rest and isinstance(rec.extra, dict):  # fields written by a newer dop survive a round trip through `extra`
            rec.extra = {**rest, **rec.extra}
        return rec.check()


def key_digest(key: CellKey) -> str:
    return hashlib.sha256(json.dumps(list(key), default=str).encode()).hexdigest()[:12]


class ResultsStore:
    """A directory of ``<record-id>.json`` files (``<benchmark>__<method>__<cell hash>__<unique>``)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def check_writable(self) -> None:
        """Fail before any work when records could not be written here (``RecordError`` naming the dir)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".write-check-", delete=True)
            probe.close()
        except OSError as err:
            raise RecordError(f"results store {self.root} (paths.results_dir) is not writable: {err.strerror}") from None

    def append(self, record: Record) -> Path:
        """Write a checked record (``RecordError`` before anything is written when it is not valid)."""
        record.check()
        self.root.mkdir(parents=True, exist_ok=True)
        unique = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(record.timestamp))}-{uuid.uuid4().hex[:8]}"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{record.benchmark}__{record.method}")
        record.record_id = f"{safe}__{key_digest(record.key)}__{unique}"
        return atomic_write_json(self.root / f"{record.record_id}.json", record.to_dict(), default=str)

    def __iter__(self) -> Iterator[Record]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("*.json")):
            if path.name.startswith("."):
                continue
            try:
                yield Record.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as err:  # a foreign or damaged file: say so, go on
                log.warning("results store: skipping %s: not a record (%s)", path, err)

    def records(self, **filters: Any) -> list[Record]:
        """Records whose fields equal every filter (e.g. ``benchmark="pope", method="dense"``)."""
        names = {f.name for f in dataclasses.fields(Record)}
        unknown = sorted(set(filters) - names)
        if unknown:
            raise ValueError(f"unknown record field {unknown[0]!r}; fields: {', '.join(sorted(names))}")
        return [r for r in self if all(getattr(r, k) == v for k, v in filters.items())]

    def exists(self, key: CellKey | tuple) -> bool:
        key = CellKey(*key)
        return any(r.key == key for r in self)

    def latest(self) -> dict[CellKey, Record]:
        """The newest record of every cell (reruns supersede older records)."""
        out: dict[CellKey, Record] = {}
        for r in sorted(self, key=lambda r: r.timestamp):
            out[r.key] = r
        return out


# --- provenance helpers ------------------------------------------------------------------------
def library_versions() -> dict[str, str]:
    out = {}
    for dist in ("dop", "transformers", "torch", "lmms_eval"):
        try:
            out[dist] = metadata.version(dist.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def git_sha(cwd: str | os.PathLike | None = None) -> str | None:
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
