"""Multi-process sweeps: a 2-rank DDP sweep (CPU, gloo) equals the single-process sweep point for point,
resume included; the SLURM launcher for multi-GPU sweep jobs composes into a consistent sbatch job.

The ranks are started as SLURM starts the tasks of a job (``SLURM_*`` variables, one process each), so
the test runs the path a ``launcher=slurm_sweep`` job takes: Lightning's SLURM environment detection,
``strategy=ddp`` without re-launch, its distributed sampler splitting the points, every rank writing
its own points into one store. ~30 s: two fresh Python processes import torch and Lightning.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import submitit
import submitit.slurm.slurm as submitit_slurm
import torch
from ddp_sweep_worker import build_job
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf
from test_sweep_store import _Killed, store_values

from dop.cli import check_launch
from dop.stages import CONF_DIR
from dop.sweep import PointScorer, SweepStore

WORKER = Path(__file__).parent / "ddp_sweep_worker.py"
ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(rank: int, ntasks: int, port: int) -> dict[str, str]:
    """The variables srun gives task ``rank`` of a one-node job with ``ntasks`` tasks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(SLURM_NTASKS=str(ntasks), SLURM_NTASKS_PER_NODE=str(ntasks), SLURM_NNODES="1", SLURM_NODEID="0",
               SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_JOB_NAME="dop-sweep", SLURM_JOB_ID="4242",
               SLURM_NODELIST="127.0.0.1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def test_ddp_sweep_equals_single_process_with_resume(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    single = build_job(tmp_path / "single")
    single.run()
    expected = store_values(single.store)
    assert len(expected) == len(single.points()) == 36  # 9 pairs x depths 0..3

    # part of the sweep, then a kill: 7 points are in the store
    original, done = PointScorer.score_point, []

    def killed_after_7(self, point):
        if len(done) == 7:
            raise _Killed("simulated kill")
        done.append(point.key)
        return original(self, point)

    monkeypatch.setattr(PointScorer, "score_point", killed_after_7)
    with pytest.raises(_Killed):
        build_job(tmp_path / "ddp").run()
    monkeypatch.setattr(PointScorer, "score_point", original)
    store = SweepStore(tmp_path / "ddp" / "sweep")
    assert sorted(p.key for p in store.points()) == sorted(done)

    # resume on 2 DDP ranks
    port, logs = free_port(), []
    procs = []
    for rank in range(2):
        log = open(tmp_path / f"rank{rank}.log", "w")  # closed below
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path / "ddp"), "2", str(tmp_path / f"rank{rank}.json")],
            env=slurm_env(rank, 2, port), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    detail = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], detail

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    computed = [set(r["computed"]) for r in ranks]
    assert all(computed) and not computed[0] & computed[1], "each rank scores its own points"
    assert computed[0] | computed[1] == set(expected) - set(done), "resume scores exactly the missing points"
    assert all(r["stats"]["skipped"] == 7 for r in ranks)
    assert store_values(store) == expected  # point for point: KL, per-sample KL, dense reference


# --- the SLURM launcher of multi-GPU sweep jobs -------------------------------------------------------
def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def sbatch_script(cfg, folder: Path) -> str:
    """The sbatch file Hydra's submitit launcher would submit for ``cfg`` (its own parameter mapping,
    ``BaseSubmititLauncher.launch``), without a cluster."""
    launcher = instantiate(cfg.hydra.launcher)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k if k in base else f"slurm_{k}": v for k, v in launcher.params.items()
              if k not in ("submitit_folder", "max_num_timeout")}
    with mock.patch.object(submitit_slurm.shutil, "which", return_value="/usr/bin/srun"):  # no srun here
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**params)
    return executor._executor._make_submission_file_text("python -m submitit.core._submit", "0")


@pytest.mark.parametrize("devices,nodes", [(4, 1), (8, 2)])
def test_slurm_sweep_launcher_is_one_ddp_job(tmp_path, monkeypatch, devices, nodes):
    cfg = _compose("launcher=slurm_sweep", "model=llava15_7b", f"sweep.devices={devices}",
                   f"sweep.num_nodes={nodes}", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}")
    assert cfg.stage == "sweep" and cfg.sweep.strategy == "ddp" and cfg.sweep.accelerator == "gpu"
    script = sbatch_script(cfg, tmp_path)
    for line in (f"--nodes={nodes}", f"--ntasks-per-node={devices}", f"--gpus-per-node={devices}",
                 "--partition=gpu", "--mem-per-gpu=64G"):
        assert f"#SBATCH {line}\n" in script, script
    assert "\nsrun " in script and "--mem=" not in script  # every task runs the job: one rank per task
    # what Lightning checks in each task of that job before it starts DDP
    monkeypatch.setenv("SLURM_NTASKS", str(devices * nodes))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", str(devices))
    monkeypatch.setenv("SLURM_NNODES", str(nodes))
    monkeypatch.setenv("SLURM_JOB_NAME", "dop")
    for key in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"):
        monkeypatch.setenv(key, "0")
    assert SLURMEnvironment.detect()
    SLURMEnvironment().validate_settings(num_devices=int(cfg.sweep.devices), num_nodes=int(cfg.sweep.num_nodes))
    with pytest.raises(ValueError, match="ntasks-per-node"):  # the pairing the launcher keeps
        SLURMEnvironment().validate_settings(num_devices=int(cfg.sweep.devices) + 1, num_nodes=nodes)


def test_slurm_sweep_shards_and_partition_check(tmp_path):
    cfg = _compose("launcher=slurm_sweep", "sweep.shard=1", "sweep.num_shards=2", "sweep.run_dir=/shared/s",
                   "hydra.launcher.partition=gpu")
    assert (cfg.sweep.shard, cfg.sweep.num_shards, cfg.sweep.run_dir) == (1, 2, "/shared/s")
    if OmegaConf.is_missing(_compose("launcher=slurm_sweep").hydra.launcher, "partition"):  # no conf/local/
        assert "hydra.launcher.partition" in check_launch(["-m", "launcher=slurm_sweep", "sweep.shard=0,1"])
