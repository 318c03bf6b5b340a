"""A sweep job: model + calibration batches + store; ``run()`` fills the store through Lightning's
``Trainer.predict`` (devices, precision, DDP, progress bar), ``measure_many`` scores policies."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from dop.adapters import get_adapter
from dop.divergence import CalibrationBatch, DenseReference, DivergenceError, fingerprint, weights_checksum
from dop.engine.front_end import nv_values, tokens_per_image
from dop.io import atomic_write_json
from dop.policy import DEFAULT_REDUCER, Policy
from dop.space import Pair, all_pairs, grid_depths, pair_key, pair_type
from dop.sweep.scorer import PointScorer, PruneFn
from dop.sweep.store import AnyPoint, NvPoint, SweepError, SweepPoint, SweepStore, shard_points, sweep_points

log = logging.getLogger("dop.sweep")

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
        processor: Any = None,
        samples: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        if len(batches) == 0:
            raise DivergenceError("the calibration set is empty: need at least one (image, question) sample")
        self.model = model
        # the calibration samples the batches were built from, and their processor: the search's
        # accuracy objective (GSOP) generates answers for them
        self.processor, self.calibration_samples = processor, list(samples) if samples is not None else None
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
        self.nv_full: int | None = None
        if n_v:
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
            log.info("sweep: %d points computed, %d already present", len(todo), stats["skipped"])
            log.debug("sweep: layer forwards %.1f of naive %d (%.3f)", spent, naive, stats["reuse_ratio"] or 0)
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
