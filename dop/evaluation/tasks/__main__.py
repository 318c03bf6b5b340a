"""``python -m dop.evaluation.tasks [DATASET_DIR [OUT_DIR]]``: write the task dir and print its path.

Defaults: dataset ``$DOP_ROOT/outputs/data/synthetic`` (built with dop.data.synthetic when missing),
task dir ``$DOP_ROOT/outputs/tasks``. Only the path goes to stdout, so
``--include_path "$(python -m dop.evaluation.tasks)"`` works.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dop.data.synthetic import ensure_dataset
from dop.evaluation.tasks import default_paths, write_task_dir


def main(argv: list[str]) -> int:
    dataset, out = default_paths()
    if len(argv) > 0:
        dataset = Path(argv[0])
    if len(argv) > 1:
        out = Path(argv[1])
    if not dataset.exists():
        dataset = ensure_dataset(dataset)
    print(write_task_dir(dataset, out).resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
