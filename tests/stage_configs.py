"""Composed configs for stage tests: the shipped conf/ tree with test overrides, typed like a stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dop.stages import CONF_DIR
from dop.stages.config import load


def compose_cfg(run_dir: Path, *overrides: str, output_dir: Path | None = None) -> DictConfig:
    """``conf/config.yaml`` with ``overrides``, writing into ``run_dir`` (outputs beside it), no W&B."""
    out = output_dir if output_dir is not None else Path(run_dir) / "out"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={out}", f"paths.run_dir={run_dir}", "logger=none",
                                             *overrides])


def stage_conf(schema: type, run_dir: Path, *overrides: str, **kwargs: Any) -> Any:
    """The typed config of a stage (``dop.stages.config``) for these overrides."""
    return load(schema, compose_cfg(run_dir, *overrides, **kwargs))


def with_nodes(cfg: DictConfig, **nodes: Any) -> DictConfig:
    """``cfg`` with whole groups replaced (e.g. ``method={"name": "standin_fastv", "layer": 1}`` for a
    test stand-in method that has no conf/method file)."""
    OmegaConf.set_struct(cfg, False)
    for key, value in nodes.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    OmegaConf.set_struct(cfg, True)
    return cfg
