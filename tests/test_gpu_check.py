"""scripts/gpu_check.sh in its CPU mode (small shape): the table it prints against independent FLOPs
counts, budget matching and a KL recomputed here (~25 s, most of it the subprocess importing torch)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from dop.bench import build_slice
from dop.budget import Budget
from dop.engine import prune
from dop.engine.baselines import known_methods
from dop.engine.baselines.budget import match_budget
from dop.flops import count_flops, equivalent_tokens, flops_for_tokens
from dop.policy import DepthPolicy, Policy

ROOT = Path(__file__).parent.parent
SMALL = {"num_layers": 4, "hidden_size": 128, "intermediate_size": 344, "num_heads": 4, "num_kv_heads": 2,
         "n_system": 35, "n_vision": 576, "n_instruction": 100}  # scripts/gpu_check.py SHAPES["small"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "rows.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    if not Path(env["PYTHON"]).exists():
        env.pop("PYTHON")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--threads", "1", "--repeats", "1",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def small_slice():
    return build_slice(**SMALL)  # seed 0: the script's model, weights included


def test_cpu_mode_says_what_it_ran(run):
    stdout, doc = run
    first = stdout.splitlines()[0]
    for part in ("mode=cpu", "device=cpu", "dtype=float32", "shape=small", "4 layers, d=128", "heads 4/2 KV",
                 "35+576+100", "kernels=['sdpa']"):
        assert part in first, first
    assert doc["mode"] == "cpu" and doc["shape"] == {"name": "small", **SMALL}
    assert "identity overhead vs stock (sdpa):" in stdout and "peak memory:" in stdout
    assert "DOP sweep point kv_vision/2" in stdout


def test_table_rows_and_flops(run, small_slice):
    stdout, doc = run
    model, _, groups = small_slice
    text = model.config.get_text_config(decoder=True)
    rows = {r["policy"]: r for r in doc["kernels"]["sdpa"]["rows"]}
    baselines = [m for m in known_methods() if m != "resize"]  # resize: Qwen-VL only, reported as skipped
    assert list(rows) == ["stock", "identity", "dop@192", "dop@128", "dop@64", *baselines]
    assert "resize" in doc["skipped"] and "skipped resize:" in stdout
    for name in rows:
        assert f"| sdpa | {name} |" in stdout

    dense = count_flops(text, groups, convention="dop")
    assert rows["stock"]["flops"] == rows["identity"]["flops"] == dense
    cuts = []
    for tokens in (192, 128, 64):
        r = rows[f"dop@{tokens}"]
        a, m = (int(part.split(">=")[1]) for part in r["knob"].split())
        policy = DepthPolicy({("attn", "vision"): a, ("mlp", "vision"): m}).expand(SMALL["num_layers"])
        assert r["flops"] == count_flops(text, groups, policy=policy, convention="dop")
        assert r["flops"] <= flops_for_tokens(text, groups, tokens, convention="dop")
        cuts.append(r["flops_reduction"])
    assert cuts == sorted(cuts) and cuts[0] > 0
    for name in baselines:
        r = rows[name]
        budget = flops_for_tokens(text, groups, 128, convention="dop")
        if r["budget"] == "128":
            assert r["flops"] == match_budget(name, text, groups, Budget("tokens", 128)).flops <= budget
        else:  # the nearest reachable budget, above 128 tokens
            assert r["budget"].startswith("nearest ") and r["flops"] > budget
            assert abs(equivalent_tokens(text, groups, r["flops"]) - float(r["budget"].split()[1])) <= 0.5
        assert r["flops_reduction"] == pytest.approx(1 - r["flops"] / dense)
        assert r["ratio"] == pytest.approx(r["latency_reduction"] / r["flops_reduction"])
        assert r["latency_s"] > 0


def test_sweep_point_kl_matches_the_engine(run, small_slice):
    _, doc = run
    point = doc["sweep_point"]
    assert point["point"] == "kv_vision/2" and point["point_s"] > 0 and point["layer_forwards"] == 2.0
    model, inputs, _ = small_slice
    torch.set_num_threads(1)  # a small model: more threads only wait on each other (restored by conftest)
    with torch.inference_mode():
        dense = model(**inputs, logits_to_keep=1).logits[:, -1].float().log_softmax(-1)
        with prune(model, DepthPolicy({("kv", "vision"): 2}).expand(SMALL["num_layers"])):
            pruned = model(**inputs, logits_to_keep=1).logits[:, -1].float().log_softmax(-1)
        with prune(model, Policy()):
            assert torch.equal(model(**inputs, logits_to_keep=1).logits[:, -1].float().log_softmax(-1), dense)
    kl = (dense.exp() * (dense - pruned)).sum().item()
    assert kl > 0 and point["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
