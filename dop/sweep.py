"""The divergence sweep: one point per (type, group, depth), run by Lightning, stored per point.

A point is ``DepthPolicy({(type, group): depth}).expand(L)`` (every other pair dense) scored with
``dop.divergence`` against the dense reference. Points are the items of a ``Trainer.predict`` loop,
so devices, precision, DDP and the progress bar are Lightning's; each point is written to
``<run>/sweep/<type>_<group>/<depth>.json`` atomically (temp file + ``os.replace``), which makes
resume (skip present points), sharding (point i belongs to shard i % n) and DDP (ranks write
disjoint points) need no coordination.

Prefix reuse: every op of a point is at layers >= depth, so layers < depth are exactly dense; the
point starts at layer ``depth`` from the dense hidden state (engine ``prefix=``). ``reuse=half_layer``
goes further for q and mlp points: the attention half of layer ``depth`` is dense for every row a
point keeps, so layer ``depth`` is computed here from the dense post-attention state (MLP only) and
the engine starts at ``depth + 1``; and a q/mlp point at the last layer for a group holding no scored
position cannot change a scored logit (KL is exactly 0, nothing runs).

The front end ``n_v`` (``dop.engine.front_end``) is one more curve: an ``NvPoint`` per configured value, the
decoder dense on the ``n_v`` tokens the reducer keeps, stored at ``<run>/sweep/n_v_<reducer>/<n_v>.json``.
Its sequence is shorter from layer 0 on, so it runs whole (no prefix reuse).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader

from dop.divergence import CalibrationBatch, DenseReference, DivergenceError, kl_per_sample, scored_logits
from dop.io import atomic_write_json
from dop.ops import OP_TYPES
from dop.policy import DEFAULT_OUTPUT_GROUPS, DepthPolicy, Policy, all_pairs
from dop.search import Pair, SearchError, interpolate_curve, pair_key, pair_type, parse_pair

log = logging.getLogger("dop.sweep")
REUSE_MODES = ("none", "prefix", "half_layer")


class SweepError(ValueError):
    """A sweep store is inconsistent, corrupt, or a sweep cannot run as configured."""


# --------------------------------------------------------------------------------------------
# Points and the store
# --------------------------------------------------------------------------------------------
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


NV_PREFIX = "n_v_"  # store folder of a front-end curve: n_v_<reducer>


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


def grid_depths(num_layers: int, step: int = 1) -> list[int]:
    """Depths 0, step, 2*step, ... and always L (the dense point)."""
    if step < 1:
        raise SweepError(f"grid step must be >= 1, got {step}")
    return sorted(set(range(0, num_layers, step)) | {num_layers})


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
                except (SearchError, ValueError):
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
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SweepError(
            f"corrupt sweep point file {path}: {exc}; delete this file to recompute the point "
            "(other points are kept)"
        ) from exc
    if fingerprint is not None and doc.get("fingerprint") != fingerprint:
        raise SweepError(f"sweep point {path} was made with dense reference {doc.get('fingerprint')}, "
                         f"expected {fingerprint}; use another run dir or merge only matching shards")
    return doc


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
PruneFn = Callable[..., Any]  # dop.engine.prune-compatible context manager


def _default_prune() -> PruneFn:
    from dop.engine import prune

    return prune


class PointScorer:
    """Scores sweep points and arbitrary policies against a dense reference on one model."""

    def __init__(
        self,
        model: nn.Module,
        reference: DenseReference,
        *,
        reuse: str = "half_layer",
        prune_fn: PruneFn | None = None,
        adapter: Any = None,
        output_groups: Iterable[str] = DEFAULT_OUTPUT_GROUPS,
    ) -> None:
        if reuse not in REUSE_MODES:
            raise SweepError(f"reuse must be one of {REUSE_MODES}, got {reuse!r}")
        self.model = model
        self.reference = reference
        self.prune = prune_fn or _default_prune()
        if adapter is None:
            from dop.adapters import get_adapter

            adapter = get_adapter(model)
        self.adapter = adapter
        self.layers = adapter.decoder_layers()
        self.num_layers = len(self.layers)
        self.output_groups = tuple(output_groups)
        self.reuse = reuse
        if reuse != "none" and reference.hidden_store == "none":
            raise SweepError("prefix reuse needs the dense hidden states (hidden_store memory or disk)")
        if reuse == "half_layer" and not reference.keep_mids:
            raise SweepError("half-layer reuse needs the dense post-attention states (keep_mids=True)")
        if reuse == "half_layer" and not all(_llama_recipe(layer) for layer in self.layers):
            log.warning("decoder layers are not pre-norm attention + MLP; using plain prefix reuse")
            self.reuse = "prefix"
        self.layer_forwards = 0.0  # layer-forward units spent on points (half a layer = 0.5)
        self.naive_layer_forwards = 0  # what scoring every point from layer 0 would have spent

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def groups(self, batch: CalibrationBatch) -> dict[str, torch.Tensor]:
        return self.adapter.token_groups(batch.inputs["input_ids"], batch.inputs.get("attention_mask"))

    @torch.no_grad()
    def score_point(self, point: AnyPoint) -> dict[str, Any]:
        """Mean KL of a single-change point over the calibration set, with its compute count."""
        Lyr = self.num_layers
        if isinstance(point, NvPoint):
            return self._score_nv(point)
        if point.depth > Lyr or point.depth < 0:
            raise SweepError(f"point {point.key}: depth outside 0..{Lyr}")
        names = self.adapter.group_names
        if point.group not in names:
            raise SweepError(f"group {point.group!r} is not a token group of this model; valid: {list(names)}")
        n = sum(b.size for b in self.reference.batches)
        if point.depth == Lyr:  # the dense point: KL 0 by definition, nothing to run
            return {"kl": 0.0, "kl_per_sample": [0.0] * n, "layer_forwards": 0.0, "naive_layer_forwards": 0}
        policy = point.policy(Lyr, self.output_groups)
        per_sample: list[float] = []
        spent = 0.0
        for b, batch in enumerate(self.reference.batches):
            kl, used = self._score_batch(b, batch, policy, point)
            per_sample.extend(kl.tolist())
            spent += used
        naive = Lyr * len(self.reference.batches)
        self.layer_forwards += spent
        self.naive_layer_forwards += naive
        return {"kl": float(np.mean(per_sample)), "kl_per_sample": per_sample, "layer_forwards": spent,
                "naive_layer_forwards": naive}

    def _score_nv(self, point: NvPoint) -> dict[str, Any]:
        per_sample: list[float] = []
        for b, batch in enumerate(self.reference.batches):
            kl, _ = self._score_batch(b, batch, point.policy(self.num_layers), None)
            per_sample.extend(kl.tolist())
        spent = naive = self.num_layers * len(self.reference.batches)  # whole forwards, no reuse
        self.layer_forwards += spent
        self.naive_layer_forwards += naive
        return {"kl": float(np.mean(per_sample)), "kl_per_sample": per_sample, "layer_forwards": float(spent),
                "naive_layer_forwards": naive}

    @torch.no_grad()
    def score_policy(self, policy: Policy) -> float:
        """Mean KL of any policy (prefix reuse up to its shallowest op)."""
        per_sample: list[float] = []
        for b, batch in enumerate(self.reference.batches):
            kl, _ = self._score_batch(b, batch, policy, None)
            per_sample.extend(kl.tolist())
        return float(np.mean(per_sample))

    def _score_batch(self, b: int, batch: CalibrationBatch, policy: Policy, point: SweepPoint | None):
        device = self.device
        rows = batch.score_mask.nonzero(as_tuple=True)[0].to(device)
        if policy.n_v is not None:  # a shorter sequence from layer 0 on: no dense prefix applies
            return self._run(front_end_batch(self.model, batch, policy), policy, None, rows, b)
        start = min((op.layer for op in policy), default=self.num_layers)
        Lyr = self.num_layers
        if start >= Lyr:  # identity: the reference itself
            return torch.zeros(batch.size, dtype=torch.float64), 0.0
        if self.reuse == "none":
            return self._run(batch, policy, None, rows, b)
        if self.reuse == "half_layer" and point is not None and point.type in ("q", "mlp"):
            g = self.groups(batch)[point.group].to(device)
            if start == Lyr - 1:
                if not bool((g & batch.score_mask.to(device)).any()):
                    # last layer, no scored row in the group: the scored logits cannot change
                    return torch.zeros(batch.size, dtype=torch.float64), 0.0
            else:
                h_in, h_mid = self.reference.hidden_at(b, start, device)
                hidden = self._half_layer(start, point.type, g, h_in, h_mid)
                kl, used = self._run(batch, policy, (start + 1, hidden), rows, b)
                return kl, used + 0.5
        prefix = (start, self.reference.input_at(b, start, device)) if start > 0 else None
        return self._run(batch, policy, prefix, rows, b)

    def _half_layer(self, d: int, op_type: str, group: torch.Tensor, h_in: torch.Tensor,
                    h_mid: torch.Tensor) -> torch.Tensor:
        """Layer d of a q or mlp point from the dense states: only its MLP half runs.

        q point: the group's rows skip attention (their residual is the layer input), every other
        row's attention output is dense (all keys kept). mlp point: attention is dense; the group's
        rows skip the MLP.
        """
        layer = self.layers[d]
        mask = group.unsqueeze(-1)
        if op_type == "q":
            x = torch.where(mask, h_in, h_mid)
            return x + layer.mlp(layer.post_attention_layernorm(x))
        x = h_mid
        return torch.where(mask, x, x + layer.mlp(layer.post_attention_layernorm(x)))

    def _run(self, batch: CalibrationBatch, policy: Policy, prefix, rows: torch.Tensor, b: int):
        kwargs = {"prefix": prefix} if prefix is not None else {}
        with self.prune(self.model, policy, **kwargs) as pruner:
            logits, _ = scored_logits(self.model, batch, self.device)
        used = float(getattr(pruner, "layer_forwards", self.num_layers - (prefix[0] if prefix else 0)))
        kl = kl_per_sample(self.reference.logp[b], logits, rows, batch.size)
        return kl.cpu(), used


def front_end_batch(model: nn.Module, batch: CalibrationBatch, policy: Policy) -> CalibrationBatch:
    """The batch a policy with ``n_v`` runs on: fewer image placeholders, the same scored positions
    (left padding keeps every row's tail, where the answer positions are, at the end)."""
    from dop.engine.front_end import prepare_inputs

    inputs = dict(prepare_inputs(model, batch.inputs, policy))
    T, T_new = batch.score_mask.shape[1], inputs["input_ids"].shape[1]
    mask = batch.score_mask[:, T - T_new:]
    if T_new > T or int(mask.sum()) != int(batch.score_mask.sum()):
        raise SweepError(f"n_v={policy.n_v}: the reduced prompt lost scored positions (padding must be left)")
    return CalibrationBatch(inputs, mask, batch.sample_ids)


def _llama_recipe(layer: nn.Module) -> bool:
    """Pre-norm residual attention + MLP (Llama, Qwen2/2.5-VL, InternVL's Qwen2): the half-layer
    shortcut reproduces exactly what such a layer computes after attention."""
    return (all(hasattr(layer, p) for p in ("self_attn", "post_attention_layernorm", "mlp"))
            and not hasattr(layer, "pre_feedforward_layernorm"))


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------
def _collate(items: list) -> list:
    return items


class SweepModule(L.LightningModule):
    """``Trainer.predict`` over sweep points (or named policies); writes each point as it is done."""

    def __init__(self, model: nn.Module, make_scorer: Callable[[nn.Module], PointScorer],
                 store: SweepStore | None, fingerprint: str) -> None:
        super().__init__()
        self.model = model
        self._make_scorer = make_scorer
        self.scorer: PointScorer | None = None
        self.store = store
        self.fingerprint = fingerprint

    def on_predict_start(self) -> None:
        # the dense reference runs here, on the device Lightning placed the model on
        self.scorer = self._make_scorer(self.model)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # points and policies are descriptions; inputs move inside the scorer

    def predict_step(self, batch: list, batch_idx: int) -> list[dict[str, Any]]:
        out = []
        for item in batch:
            t0 = time.perf_counter()
            if isinstance(item, (SweepPoint, NvPoint)):
                record = self.scorer.score_point(item)
                record.update(fingerprint=self.fingerprint, seconds=time.perf_counter() - t0)
                if self.store is not None:
                    self.store.write(item, record)
                out.append({"point": item.key, **record})
            else:
                name, policy = item
                out.append({"policy": name, "kl": self.scorer.score_policy(policy),
                            "seconds": time.perf_counter() - t0})
        return out


# --------------------------------------------------------------------------------------------
# A sweep job: model + calibration set + store, from a config or from objects (tests)
# --------------------------------------------------------------------------------------------
class SweepJob:
    """Everything a sweep or a search needs; ``run()`` fills the store, ``measure_kl`` scores."""

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[CalibrationBatch],
        *,
        model_id: str,
        run_dir: str | os.PathLike,
        pairs: Sequence[Pair] | None = None,
        grid_step: int = 1,
        reuse: str = "half_layer",
        hidden_store: str = "memory",
        shard: int = 0,
        num_shards: int = 1,
        response_tokens: int = 1,
        trainer_kwargs: Mapping[str, Any] | None = None,
        prune_fn: PruneFn | None = None,
        sweep_dir: str | os.PathLike | None = None,
        flops_groups: Mapping[str, float] | None = None,
        n_v: Sequence[int] | None = None,
        reducer: str | None = None,
    ) -> None:
        from dop.adapters import get_adapter
        from dop.divergence import fingerprint, weights_checksum

        if len(batches) == 0:
            raise DivergenceError("the calibration set is empty: need at least one (image, question) sample")
        self.model = model
        self.adapter = get_adapter(model)
        self.num_layers = self.adapter.num_layers
        names = list(self.adapter.group_names)
        self.pairs = [(pair_type(t), g) for t, g in (pairs or all_pairs(names))]
        missing = sorted({g for _, g in self.pairs} - set(names))
        if missing:
            raise SweepError(f"searched group {missing[0]!r} is not a token group of this model "
                             f"({type(model).__name__}); valid groups: {names}")
        self.model_id = model_id
        self.run_dir = Path(run_dir)
        self.store = SweepStore(sweep_dir if sweep_dir is not None else self.run_dir / "sweep")
        self.grid_step = int(grid_step)
        self.reuse = reuse
        self.shard, self.num_shards = int(shard), int(num_shards)
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.prune_fn = prune_fn
        self._flops_groups = dict(flops_groups) if flops_groups else None
        # the n_v front end: its grid (configured values below the full count, and the full count)
        self.reducer: str | None = None
        self.nv_grid: list[int] = []
        if n_v:
            from dop.engine.front_end import nv_values, tokens_per_image
            from dop.policy import DEFAULT_REDUCER

            self.reducer = str(reducer or DEFAULT_REDUCER)
            rows = [int(n) for b in batches for n in self.adapter.token_groups(
                b.inputs["input_ids"], b.inputs.get("attention_mask"))["vision"].sum(1)]
            self.nv_full = tokens_per_image(model, self.reducer, rows)
            self.nv_grid = nv_values(list(n_v), self.nv_full)
        dtype = next(model.parameters()).dtype
        ids = [i for b in batches for i in b.sample_ids]
        fp = fingerprint(model_id, ids, dtype, weights=weights_checksum(model), response_tokens=response_tokens)
        hidden = hidden_store if reuse != "none" else "none"
        self.reference = DenseReference(batches, fp, self.num_layers, self.run_dir / "dense", hidden,
                                        keep_mids=reuse == "half_layer")
        self.last_stats: dict[str, Any] = {}
        self._reference_device: torch.device | None = None

    @property
    def text_config(self) -> Any:
        return self.adapter.text_config()

    def points(self) -> list[AnyPoint]:
        nv = [NvPoint(self.reducer, v) for v in self.nv_grid if v < self.nv_full]
        return [*sweep_points(self.pairs, self.num_layers, self.grid_step), *nv]

    def nv_curve(self) -> dict[int, float]:
        """KL per ``n_v`` of the grid (the full count is dense: 0); empty without a front end."""
        if not self.nv_grid:
            return {}
        have = self.store.nv_curve(self.reducer, self.reference.fingerprint)
        missing = [v for v in self.nv_grid if v < self.nv_full and v not in have]
        if missing:
            raise SweepError(f"sweep store {self.store.root} has no n_v point {missing[0]} for reducer "
                             f"{self.reducer!r}; run the sweep")
        return {v: (0.0 if v >= self.nv_full else have[v]) for v in self.nv_grid}

    def meta(self) -> dict[str, Any]:
        meta = {"fingerprint": self.reference.fingerprint, "model": self.model_id, "num_layers": self.num_layers,
                "pairs": [pair_key(p) for p in self.pairs], "grid": grid_depths(self.num_layers, self.grid_step),
                "sample_ids": self.reference.sample_ids}
        if self.nv_grid:
            meta.update(n_v=[v for v in self.nv_grid if v < self.nv_full], reducer=self.reducer)
        return meta

    def _make_scorer(self, model: nn.Module) -> PointScorer:
        device = next(model.parameters()).device
        if self._reference_device != device:  # once per process and device (hidden states live there)
            self.reference.build(model, self.adapter.decoder_layers(), device)
            self._reference_device = device
        return PointScorer(model, self.reference, reuse=self.reuse, prune_fn=self.prune_fn, adapter=self.adapter)

    def _trainer(self) -> L.Trainer:
        kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                  "enable_model_summary": False, "enable_progress_bar": False}
        kwargs.update(self.trainer_kwargs)
        return L.Trainer(**kwargs)

    def _predict(self, items: list, store: SweepStore | None) -> list[dict[str, Any]]:
        module = SweepModule(self.model, self._make_scorer, store, self.reference.fingerprint)
        loader = DataLoader(items, batch_size=1, shuffle=False, collate_fn=_collate)
        out = self._trainer().predict(module, dataloaders=loader, return_predictions=True) or []
        self._last_scorer = module.scorer
        return [r for batch in out for r in batch]

    def run(self, *, complete: bool = False) -> dict[str, Any]:
        """Score this shard's missing points (``complete``: every missing point, all shards)."""
        self.store.check_meta(self.meta())
        points = self.points()
        mine = points if complete else shard_points(points, self.shard, self.num_shards)
        fp = self.reference.fingerprint
        todo = [p for p in mine if not self.store.has(p, fp)]
        stats = {"points": len(mine), "computed": len(todo), "skipped": len(mine) - len(todo)}
        if todo:
            records = self._predict(todo, self.store)
            spent = sum(r["layer_forwards"] for r in records)
            naive = sum(r["naive_layer_forwards"] for r in records)
            stats.update(layer_forwards=spent, naive_layer_forwards=naive,
                         reuse_ratio=spent / naive if naive else None,
                         dense_layer_forwards=self.reference.dense_layer_forwards)
            log.info("sweep: %d points computed, %d present; layer forwards %.1f of naive %d (%.3f)",
                     len(todo), stats["skipped"], spent, naive, stats["reuse_ratio"] or 0)
        shard_file = self.store.root / "shards" / f"{self.shard}_of_{self.num_shards}.json"
        if todo or not shard_file.exists():  # keep the compute record of the run that did the work
            atomic_write_json(shard_file, {"fingerprint": fp, **stats})
        self.last_stats = stats
        return stats

    def measure_kl(self, policy: Policy) -> float:
        return self.measure_many({"policy": policy})["policy"]

    def measure_many(self, policies: Mapping[str, Policy]) -> dict[str, float]:
        """Measured mean KL of each policy on the calibration set (one Lightning predict)."""
        out = self._predict(list(policies.items()), None)
        return {r["policy"]: r["kl"] for r in out}

    def flops_groups(self) -> dict[str, float]:
        """Token counts per group for FLOPs budgets: configured, else the calibration-set mean."""
        if self._flops_groups:
            return dict(self._flops_groups)
        totals: dict[str, float] = {}
        n = 0
        for batch in self.reference.batches:
            groups = self.adapter.token_groups(batch.inputs["input_ids"], batch.inputs.get("attention_mask"))
            for g, mask in groups.items():
                totals[g] = totals.get(g, 0.0) + float(mask.sum())
            n += batch.size
        return {g: round(v / n) for g, v in totals.items()}

    # --- from a Hydra config ----------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Any) -> SweepJob:
        from dop.divergence import calibration_batches
        from dop.models import load_model

        method, sweep = cfg.method, cfg.get("sweep", {}) or {}
        model, processor = load_model(str(cfg.model.pretrained), dtype=cfg.model.get("dtype"),
                                      attn_implementation=str(cfg.model.get("attn_implementation", "sdpa")))
        n = int(method.get("num_calibration", cfg.data.get("num_calibration", 64)))
        samples = load_calibration(cfg, n)
        response_tokens = int(method.get("response_tokens", 1))
        batches = calibration_batches(processor, samples, int(sweep.get("batch_size", 8)), model=model,
                                      response_tokens=response_tokens)
        pairs = _configured_pairs(method)
        run_dir = Path(sweep.get("run_dir") or _run_dir(cfg))
        trainer = {k: sweep[k] for k in ("accelerator", "devices", "strategy", "precision", "num_nodes")
                   if sweep.get(k) is not None}
        device = str(cfg.get("device", "auto"))
        if device == "cpu":
            trainer.update(accelerator="cpu", devices=1)
        elif device.startswith("cuda"):  # cuda or cuda:N -> Lightning's gpu accelerator on that index
            index = device.split(":", 1)[1] if ":" in device else None
            trainer.update(accelerator="gpu", devices=[int(index)] if index is not None else trainer.get("devices", 1))
        trainer["enable_progress_bar"] = bool(sweep.get("progress_bar", False))
        groups = method.get("flops_groups")
        job = cls(model, batches, model_id=str(cfg.model.get("hf_id") or cfg.model.pretrained), run_dir=run_dir,
                   pairs=pairs, grid_step=int(method.get("grid_step", 1)), reuse=str(sweep.get("reuse", "half_layer")),
                   hidden_store=str(sweep.get("hidden_store", "memory")), shard=int(sweep.get("shard", 0)),
                   num_shards=int(sweep.get("num_shards", 1)), response_tokens=response_tokens,
                   trainer_kwargs=trainer, flops_groups=dict(groups) if groups else None,
                   sweep_dir=sweep.get("dir"), n_v=_configured_nv(method), reducer=method.get("reducer"))
        job.processor, job.calibration_samples = processor, samples  # for dop.search objective=accuracy
        return job


def _configured_nv(method: Any) -> list[int] | None:
    """``method.n_v``: null (no front end) or the candidate values of the joint search."""
    values = method.get("n_v")
    if values is None:
        return None
    if isinstance(values, (int, float, str)):
        raise SweepError(f"method.n_v must be a list of candidate token counts or fractions of the visual tokens, "
                         f"e.g. [576, 192, 64] or [1.0, 0.333, 0.111], got {values!r}")
    return list(values)


def _configured_pairs(method: Any) -> list[Pair] | None:
    if method.get("pairs"):
        return [parse_pair(str(p)) for p in method.pairs]
    groups = method.get("groups")
    types = method.get("types") or [t.value for t in OP_TYPES]
    if not groups:
        return None
    pairs = [(pair_type(str(t)), str(g)) for t in types for g in groups]
    if len(set(pairs)) != len(pairs):
        raise SweepError(f"method.types/groups repeat a parameter: {types} x {groups}")
    return pairs


def _run_dir(cfg: Any) -> str:
    try:
        return str(cfg.paths.run_dir)
    except Exception:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir


def load_calibration(cfg: Any, n: int) -> list[dict[str, Any]]:
    """``n`` calibration samples (``id, image, question`` and ``answer`` where the data has one)
    from ``cfg.data``: synthetic, an on-disk dataset or lmms-eval task docs (``dop.data``)."""
    from dop.data.calibration import CalibrationError
    from dop.data.calibration import load_calibration as loader

    if n < 1:
        raise DivergenceError(f"num_calibration must be >= 1, got {n}")
    try:
        return list(loader(cfg.data, n))
    except CalibrationError as e:
        raise SweepError(f"calibration data={cfg.data.get('name')!r}: {e}") from e


# --------------------------------------------------------------------------------------------
# Merge and the stage entry points
# --------------------------------------------------------------------------------------------
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


def run(cfg: Any) -> dict[str, Any]:
    """``dop stage=sweep [sweep.shard=k sweep.num_shards=n]``."""
    job = SweepJob.from_config(cfg)
    stats = job.run()
    if rank_zero_only.rank == 0:  # a DDP job (launcher=slurm_sweep) mirrors to W&B once, not once per rank
        _log_tracking(cfg, job, stats)
    return stats


def _log_tracking(cfg: Any, job: SweepJob, stats: Mapping[str, Any]) -> None:
    """Mirror the sweep's compute and (when complete) its curves to W&B; optional."""
    try:
        from dop.tracking import log_metrics, log_table, start_run
    except ImportError:
        return
    try:
        with start_run(cfg, "sweep", job.run_dir) as run:
            log_metrics(run, {f"sweep/{k}": v for k, v in stats.items()})
            rows = []
            for pair in job.pairs:
                for depth, kl in sorted(job.store.curve_points(pair).items()):
                    rows.append([pair_key(pair), depth, kl])
            log_table(run, "sweep/points", ["pair", "depth", "kl"], rows)
    except Exception as exc:  # a mirror failing must not fail the sweep
        log.warning("W&B logging skipped: %s", exc)


def run_merge(cfg: Any) -> dict[str, Any]:
    """``dop stage=merge sweep.merge_from=[dir,...]``: gather shard stores into this run's store."""
    sweep = cfg.get("sweep", {}) or {}
    run_dir = Path(sweep.get("run_dir") or _run_dir(cfg))
    target = SweepStore(sweep.get("dir") or run_dir / "sweep")
    report = merge_stores(target, list(sweep.get("merge_from") or []))
    if not report["complete"]:
        log.warning("merged store is missing %d points, e.g. %s", len(report["missing"]), report["missing"][:3])
    atomic_write_json(target.root / "merge.json", report)
    return report
