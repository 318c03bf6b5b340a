"""The sweep store: one JSON file per point, written atomically; resume, shards and merge.

``<root>/<type>_<group>/<depth>.json`` per depth point, ``<root>/n_v_<reducer>/<n_v>.json`` per
front-end point, and ``<root>/meta.json`` (the dense reference's fingerprint, the grid).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dop.errors import DopError
from dop.io import atomic_write_json
from dop.policy import DEFAULT_OUTPUT_GROUPS, DepthPolicy, Policy
from dop.space import Pair, SpaceError, grid_depths, interpolate_curve, pair_key, parse_pair


class SweepError(DopError, ValueError):
    """A sweep store is inconsistent, corrupt, or a sweep cannot run as configured."""

@dataclass(frozen=True, order=True)
class SweepPoint:
    type: str
    group: str
    depth: int

    @property
    def pair(self) -> Pair:
        return (self.type, self.group)

    @property
    def key(self) -> str:
        return f"{pair_key(self.pair)}/{self.depth}"

    @property
    def folder(self) -> str:
        return pair_key(self.pair)

    @property
    def value(self) -> int:
        return self.depth

    def policy(self, num_layers: int, output_groups: Iterable[str] = DEFAULT_OUTPUT_GROUPS) -> Policy:
        return DepthPolicy({self.pair: self.depth}).expand(num_layers, output_groups=output_groups)

NV_PREFIX = "n_v_"
NEGATIVE_KL_TOL = 1e-5  # store folder of a front-end curve: n_v_<reducer>

@dataclass(frozen=True, order=True)
class NvPoint:
    """One point of the ``n_v`` curve: every operation dense, ``n_v`` visual tokens per image kept by
    ``reducer`` (``dop.engine.front_end``)."""

    reducer: str
    n_v: int
    type = "n_v"

    @property
    def folder(self) -> str:
        return f"{NV_PREFIX}{self.reducer}"

    @property
    def value(self) -> int:
        return self.n_v

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.n_v}"

    def policy(self, num_layers: int, output_groups: Iterable[str] = DEFAULT_OUTPUT_GROUPS) -> Policy:
        return Policy(num_layers=num_layers, n_v=self.n_v, reducer=self.reducer)

AnyPoint = SweepPoint | NvPoint

def sweep_points(pairs: Sequence[Pair], num_layers: int, step: int = 1) -> list[SweepPoint]:
    """Every (pair, grid depth), in a stable order (shards index into it)."""
    return [SweepPoint(t, g, d) for t, g in pairs for d in grid_depths(num_layers, step)]

def shard_points(points: Sequence[SweepPoint], shard: int, num_shards: int) -> list[SweepPoint]:
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise SweepError(f"shard {shard} of {num_shards}: need 0 <= shard < num_shards")
    return [p for i, p in enumerate(points) if i % num_shards == shard]

class SweepStore:
    """``<root>/<type>_<group>/<depth>.json`` per point, plus ``<root>/meta.json``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, point: AnyPoint) -> Path:
        return self.root / point.folder / f"{point.value}.json"

    def read(self, point: AnyPoint, fingerprint: str | None = None) -> dict | None:
        """The point's record, ``None`` if absent; a corrupt file is an error naming it."""
        path = self.path(point)
        if not path.exists():
            return None
        return _read_point(path, fingerprint)

    def write(self, point: AnyPoint, record: Mapping[str, Any]) -> None:
        where = ({"n_v": point.n_v, "reducer": point.reducer} if isinstance(point, NvPoint)
                 else {"group": point.group, "depth": point.depth})
        atomic_write_json(self.path(point), {**record, "type": point.type, **where})

    def has(self, point: AnyPoint, fingerprint: str | None = None) -> bool:
        return self.read(point, fingerprint) is not None

    def points(self) -> list[AnyPoint]:
        """Every point file present."""
        out: list[AnyPoint] = []
        if not self.root.exists():
            return out
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if folder.name.startswith(NV_PREFIX):
                reducer, pair = folder.name[len(NV_PREFIX):], None
            else:
                try:
                    reducer, pair = None, parse_pair(folder.name)
                except SpaceError:
                    continue
            for f in folder.glob("*.json"):
                if f.stem.isdigit():
                    v = int(f.stem)
                    out.append(NvPoint(reducer, v) if pair is None else SweepPoint(*pair, v))
        return sorted(out, key=lambda p: p.key)

    def meta(self) -> dict | None:
        path = self.root / "meta.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SweepError(f"corrupt sweep meta file {path}: {exc}") from exc

    def check_meta(self, meta: Mapping[str, Any]) -> None:
        """Write ``meta.json`` or check an existing one names the same dense reference."""
        have = self.meta()
        if have is None:
            atomic_write_json(self.root / "meta.json", dict(meta))
            return
        if have.get("fingerprint") != meta.get("fingerprint"):
            raise SweepError(
                f"sweep store {self.root} was made with dense reference {have.get('fingerprint')}, this "
                f"sweep has {meta.get('fingerprint')} (other model, weights, samples or dtype); use another run dir"
            )

    def curve_points(self, pair: Pair, fingerprint: str | None = None) -> dict[int, float]:
        out = {}
        folder = self.root / pair_key(pair)
        if folder.exists():
            for f in folder.glob("*.json"):
                if f.stem.isdigit():
                    out[int(f.stem)] = float(_read_point(f, fingerprint)["kl"])
        return out

    def nv_curve(self, reducer: str, fingerprint: str | None = None) -> dict[int, float]:
        """KL per measured ``n_v`` of ``reducer`` (no interpolation: the search uses these values)."""
        folder = self.root / f"{NV_PREFIX}{reducer}"
        out = {}
        if folder.exists():
            for f in folder.glob("*.json"):
                if f.stem.isdigit():
                    out[int(f.stem)] = float(_read_point(f, fingerprint)["kl"])
        return out

    def curves(self, pairs: Sequence[Pair], num_layers: int, fingerprint: str | None = None) -> dict[Pair, np.ndarray]:
        """Per pair, the KL at every depth 0..L (interpolated between swept depths)."""
        out = {}
        for pair in pairs:
            pts = self.curve_points(pair, fingerprint)
            if not pts:
                raise SweepError(f"sweep store {self.root} has no points for {pair_key(pair)}; run the sweep")
            out[pair] = interpolate_curve(pts, num_layers)
        return out

def _read_point(path: Path, fingerprint: str | None) -> dict:
    try:
        doc = json.loads(path.read_text())
        kl = float(doc["kl"])
        if not math.isfinite(kl):
            raise ValueError(f"kl is {kl}")
        if kl < -NEGATIVE_KL_TOL:  # a KL divergence is >= 0; float noise of a few 1e-7 is not an error
            raise ValueError(f"kl is {kl}, a KL divergence cannot be negative")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SweepError(
            f"corrupt sweep point file {path}: {exc}; delete this file to recompute the point "
            "(other points are kept)"
        ) from exc
    if fingerprint is not None and doc.get("fingerprint") != fingerprint:
        raise SweepError(f"sweep point {path} was made with dense reference {doc.get('fingerprint')}, "
                         f"expected {fingerprint}; use another run dir or merge only matching shards")
    return doc

def merge_stores(target: SweepStore, sources: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Copy the points of shard stores into ``target``; refuse when dense references differ."""
    fps: dict[str, str] = {}
    metas = []
    for src in sources:
        src = Path(src)
        root = src / "sweep" if (src / "sweep").is_dir() else src
        store = SweepStore(root)
        meta = store.meta()
        if meta is None:
            raise SweepError(f"{root} is not a sweep store (no meta.json)")
        fps[str(root)] = meta.get("fingerprint")
        metas.append((store, meta))
    have = target.meta()
    if have is not None:
        fps[str(target.root)] = have.get("fingerprint")
    if len(set(fps.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in fps.items())
        raise SweepError(f"refusing to merge sweeps made with different dense references ({detail})")
    copied = 0
    for store, meta in metas:
        if store.root.resolve() == target.root.resolve():
            continue
        target.check_meta(meta)
        for point in store.points():
            record = store.read(point, meta["fingerprint"])
            if target.read(point, meta["fingerprint"]) is None:
                target.write(point, record)
                copied += 1
    meta = target.meta()
    if meta is None:
        raise SweepError("nothing to merge: no shard stores given and no store here")
    expected: list[AnyPoint] = [SweepPoint(*parse_pair(k), d) for k in meta["pairs"] for d in meta["grid"]]
    expected += [NvPoint(meta["reducer"], v) for v in meta.get("n_v") or []]
    missing = [p.key for p in expected if target.read(p, meta["fingerprint"]) is None]
    return {"copied": copied, "points": len(expected) - len(missing), "missing": missing,
            "complete": not missing, "fingerprint": meta["fingerprint"]}
