"""Data: the synthetic image-QA benchmark (``dop.data.synthetic``) and calibration samples
(``dop.data.calibration``: synthetic, a dataset on disk, or an lmms-eval task's docs).

Owns reading and generating image-question data. May import the concepts only (lmms-eval is
loaded inside the one loader that reads task docs); the stages pass it typed data configs.
"""

from dop.data.calibration import load_calibration
from dop.data.synthetic import (
    chance_accuracy,
    ensure_dataset,
    generate_splits,
    load_dataset_dir,
)

__all__ = ["chance_accuracy", "ensure_dataset", "generate_splits", "load_calibration", "load_dataset_dir"]
