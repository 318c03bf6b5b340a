"""Data: the synthetic image-QA benchmark (``dop.data.synthetic``)."""

from dop.data.synthetic import (
    chance_accuracy,
    ensure_dataset,
    generate_splits,
    load_dataset_dir,
)

__all__ = ["chance_accuracy", "ensure_dataset", "generate_splits", "load_dataset_dir"]
