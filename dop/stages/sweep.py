"""``dop stage=sweep`` (one shard of the divergence sweep) and ``dop stage=merge`` (gather shards).

    dop stage=sweep sweep.shard=0 sweep.num_shards=4      # one shard of four
    dop stage=merge sweep.merge_from=[dirA,dirB]           # gather shard stores, check fingerprints

``build_job`` turns the typed config into a ``dop.sweep.SweepJob`` (model, calibration batches,
store); the search stage builds its job the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from dop.data.calibration import CalibrationError, load_calibration
from dop.divergence import calibration_batches
from dop.io import atomic_write_json
from dop.models import load_model, resolve_device
from dop.space import Pair, pair_key, pair_type, parse_pair
from dop.stages.config import DopMethodConfig, SweepStage, load
from dop.stages.schema import ConfigError
from dop.sweep import SweepJob, SweepStore, merge_stores
from dop.tracking import log_metrics, log_table, start_run

log = logging.getLogger("dop.sweep")


def run(cfg: DictConfig) -> dict[str, Any]:
    """``dop stage=sweep``."""
    return execute(load(SweepStage, cfg), config=cfg)


def execute(conf: SweepStage, config: Any = None) -> dict[str, Any]:
    set_threads(conf.num_threads)
    job = build_job(conf)
    stats = job.run()
    if rank_zero_only.rank != 0:  # a DDP job (launcher=slurm_sweep) mirrors to W&B once, not once per rank
        return stats
    with start_run(conf.logger, "sweep", job.run_dir, config) as wb:
        log_metrics(wb, {f"sweep/{k}": v for k, v in stats.items()})
        rows = [[pair_key(pair), depth, kl] for pair in job.pairs
                for depth, kl in sorted(job.store.curve_points(pair).items())]
        log_table(wb, "sweep/points", ["pair", "depth", "kl"], rows)
    return stats


def set_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(int(num_threads))


def run_dir_of(conf: SweepStage) -> Path:
    """Where the sweep lives: ``sweep.run_dir`` (to share one), else this stage's run dir."""
    return Path(conf.sweep.run_dir or conf.paths.run_dir)


def configured_pairs(method: DopMethodConfig) -> list[Pair]:
    """The searched parameters: ``method.pairs``, else ``method.types`` x ``method.groups``."""
    if method.pairs:
        return [parse_pair(str(p)) for p in method.pairs]
    pairs = [(pair_type(t), g) for t in method.types for g in method.groups]
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"method.types={method.types} x method.groups={method.groups} repeat a parameter")
    return pairs


def trainer_settings(conf: SweepStage) -> dict[str, Any]:
    """Lightning ``Trainer`` keywords: ``sweep.*`` with the device of ``device=``."""
    sweep = conf.sweep
    trainer = {"accelerator": sweep.accelerator, "devices": sweep.devices, "strategy": sweep.strategy,
               "precision": sweep.precision, "enable_progress_bar": sweep.progress_bar}
    if sweep.num_nodes is not None:
        trainer["num_nodes"] = sweep.num_nodes
    device = resolve_device(conf.device) if conf.device != "auto" else "auto"
    if device == "cpu":
        trainer.update(accelerator="cpu", devices=1)
    elif device.startswith("cuda"):  # cuda or cuda:N -> Lightning's gpu accelerator on that index
        index = device.split(":", 1)[1] if ":" in device else None
        trainer.update(accelerator="gpu", devices=[int(index)] if index is not None else sweep.devices)
    return trainer


def calibration_samples(conf: SweepStage) -> list[dict[str, Any]]:
    """``method.num_calibration`` samples of the data group's calibration source."""
    try:
        return load_calibration(conf.data, conf.method.num_calibration)
    except CalibrationError as err:
        raise ConfigError(f"data={conf.data.name}: {err}") from None


def build_job(conf: SweepStage) -> SweepJob:
    """The sweep job of a sweep or search stage: model, calibration batches, store, trainer."""
    method = conf.method
    samples = calibration_samples(conf)  # before the model: a bad data source fails in seconds
    model, processor = load_model(conf.model.pretrained, dtype=conf.model.dtype,
                                  attn_implementation=conf.model.attn_implementation)
    batches = calibration_batches(processor, samples, conf.sweep.batch_size, model=model,
                                  response_tokens=method.response_tokens)
    job = SweepJob(model, batches, model_id=conf.model.hf_id or conf.model.pretrained, run_dir=run_dir_of(conf),
                   pairs=configured_pairs(method), grid_step=method.grid_step, reuse=conf.sweep.reuse,
                   hidden_store=conf.sweep.hidden_store, shard=conf.sweep.shard, num_shards=conf.sweep.num_shards,
                   response_tokens=method.response_tokens, trainer_kwargs=trainer_settings(conf),
                   flops_groups=method.flops_groups, sweep_dir=conf.sweep.dir, n_v=method.n_v,
                   reducer=method.reducer, processor=processor, samples=samples)
    return job


def run_merge(cfg: DictConfig) -> dict[str, Any]:
    """``dop stage=merge sweep.merge_from=[dir,...]``: gather shard stores into this run's store."""
    conf = load(SweepStage, cfg)
    target = SweepStore(conf.sweep.dir or run_dir_of(conf) / "sweep")
    report = merge_stores(target, list(conf.sweep.merge_from))
    if not report["complete"]:
        log.warning("merged store is missing %d points, e.g. %s", len(report["missing"]), report["missing"][:3])
    atomic_write_json(target.root / "merge.json", report)
    return report
