"""`lmms-eval --model dop` finds the plugin through the entry point and runs the local task."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from evaluation_fixtures import save_synthetic, save_tiny_llava  # noqa: E402


def test_lmms_eval_cli_finds_dop_plugin(tmp_path):
    model_dir = save_tiny_llava(tmp_path / "model")
    data = save_synthetic(tmp_path / "data", n=6)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "DOP_ROOT": str(tmp_path)}
    # `python -m dop.evaluation.tasks DATA OUT` prints only the include dir
    tasks = subprocess.run([sys.executable, "-m", "dop.evaluation.tasks", str(data), str(tmp_path / "tasks")],
                           capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert Path(tasks, "dop_synthetic.yaml").is_file()
    exe = shutil.which("lmms-eval") or str(Path(sys.executable).with_name("lmms-eval"))
    cmd = [exe, "--model", "dop", "--model_args", f"pretrained={model_dir},batch_size=2",
           "--tasks", "dop_synthetic", "--limit", "4", "--include_path", tasks,
           "--output_path", str(tmp_path / "out"), "--verbosity", "WARNING"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list((tmp_path / "out").rglob("*_results.json"))
    assert files, proc.stdout[-2000:]
    res = json.loads(files[0].read_text())
    assert res["n-samples"]["dop_synthetic"]["effective"] == 4
    assert 0.0 <= res["results"]["dop_synthetic"]["exact_match,none"] <= 1.0
