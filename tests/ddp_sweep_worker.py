"""One rank of a DDP sweep on CPU (gloo), started by tests/test_sweep_ddp.py the way SLURM starts a
task: ``SLURM_NTASKS``/``SLURM_PROCID``/... in the environment, so Lightning's SLURM environment
detection gives each process its rank and nothing is re-launched (``creates_processes_externally``).

    python tests/ddp_sweep_worker.py <run_dir> <devices> <out.json>

Also imported by the test for the single-process run: both build the same job (same seed, same
tiny random LLaVA, same calibration batches), so their stores must agree point for point.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tiny_models import build_llava

from dop.divergence import CalibrationBatch
from dop.sweep import SweepJob

LAYERS = 3


def build_job(run_dir: str | Path, trainer_kwargs: dict | None = None) -> SweepJob:
    """A 3-layer tiny random LLaVA, 2 batches of 2 calibration samples, every (type, group) pair."""
    model, make = build_llava(layers=LAYERS, seed=0)
    batches = []
    for i in range(2):
        inputs = dict(make(batch=2, seed=i))
        mask = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
        mask[:, -1] = True
        batches.append(CalibrationBatch(inputs, mask, [f"b{i}s{j}" for j in range(2)]))
    return SweepJob(model, batches, model_id="tiny-random", run_dir=run_dir, trainer_kwargs=trainer_kwargs)


def main() -> None:
    run_dir, devices, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    job = build_job(run_dir, {"accelerator": "cpu", "devices": devices, "strategy": "ddp"})
    computed = []
    original = job._predict

    def recording(items, store):  # the points this rank scored (Lightning's sampler split them)
        records = original(items, store)
        computed.extend(r["point"] for r in records if "point" in r)
        return records

    job._predict = recording
    stats = job.run()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out.write_text(json.dumps({"rank": rank, "world_size": world, "computed": computed, "stats": stats}))


if __name__ == "__main__":
    main()
