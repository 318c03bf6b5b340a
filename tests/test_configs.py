"""Every shipped config composes, and its interpolations resolve (outside Hydra's runtime)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dop.stages import CONF_DIR

SKIP_GROUPS = {"local", "hydra", "experiment", "launcher"}  # local: git-ignored; the others: test_experiments.py


def _options():
    for group in sorted(p for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name not in SKIP_GROUPS):
        for f in sorted(group.glob("*.yaml")):
            yield group.name, f.stem


@pytest.mark.parametrize("group,option", list(_options()))
def test_config_composes(group, option, tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"{group}={option}", f"paths.run_dir={tmp_path}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["stage"] == "pipeline"
    assert group not in ("model",) or resolved["model"]["name"]


def test_default_config_is_the_embedded_default(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.run_dir={tmp_path}"])
    assert cfg.model.name == "tiny_llava" and cfg.data.name == "synthetic"
    assert cfg.benchmark.name == "synthetic" and cfg.method.name == "dop"
    # budget=model: the model config's own budgets (12/8/6 of the tiny model's 16 visual tokens)
    assert cfg.budget.kind == cfg.model.budgets.kind == "tokens" and list(cfg.budget["values"]) == [12, 8, 6]
