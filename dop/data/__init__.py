"""Data: the synthetic image-QA benchmark (``dop.data.synthetic``) and calibration samples
(``dop.data.calibration``)."""

from dop.data.calibration import load_calibration
from dop.data.synthetic import (
    chance_accuracy,
    ensure_dataset,
    generate_splits,
    load_dataset_dir,
)

__all__ = ["chance_accuracy", "ensure_dataset", "generate_splits", "load_calibration", "load_dataset_dir"]
