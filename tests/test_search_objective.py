"""method.objective=accuracy: GSOP-style greedy on calibration-set task accuracy (dop.search)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("dop.engine")
pytest.importorskip("dop.flops")

from evaluation_fixtures import synthetic_dataset, tiny_llava  # noqa: E402
from stage_configs import stage_conf  # noqa: E402

import dop.search as search  # noqa: E402
import dop.stages.search as search_stage  # noqa: E402
import dop.sweep as sweep  # noqa: E402
from dop.divergence import calibration_batches  # noqa: E402
from dop.evaluation.scoring import calibration_accuracy  # noqa: E402
from dop.policy import DepthPolicy, Policy  # noqa: E402
from dop.stages.config import SearchStage  # noqa: E402
from dop.stages.schema import ConfigError  # noqa: E402

VIS, INS = ("mlp", "vision"), ("mlp", "instruction")


# --- the greedy itself, on a crafted cost model and accuracy oracle ------------------------------
def _cost(pairs=(VIS, INS), per_layer=(10.0, 4.0), L=3):
    """Per layer: 1 + 10 while vision's mlp runs + 4 while instruction's mlp runs (dense 45)."""
    saving = dict(zip(("vision", "instruction"), per_layer))

    def count(policy: Policy) -> float:
        return sum(1 + sum(s for g, s in saving.items() if not policy.is_pruned(v, g, "mlp")) for v in range(L))

    return search.CostModel.from_counter(count, L, ["system", "vision", "instruction"], list(pairs))


def _oracle(losses, calls=None):
    """Accuracy = 1 - sum of per-(pair, depth) losses, read off each candidate policy's ops."""
    def accuracy(policies):
        if calls is not None:
            calls.append(sorted(policies))
        out = {}
        for name, policy in policies.items():
            acc = 1.0
            for pair, loss in losses.items():
                depth = min((op.layer for op in policy if (op.type.value, op.group) == pair), default=3)
                acc -= loss[depth]
            out[name] = acc
        return out
    return accuracy


LOSSES = {VIS: {3: 0.0, 2: 0.05, 1: 0.30, 0: 0.6}, INS: {3: 0.0, 2: 0.01, 1: 0.02, 0: 0.5}}


def test_greedy_takes_best_accuracy_per_flop_decrements():
    cost = _cost()
    assert cost.dense == 45
    calls = []
    # by hand: ins 3->2 (0.01/4) < vis 3->2 (0.05/10); ins 2->1 (0.01/4); vis 3->2 (0.005) < ins 1->0
    # (0.48/4); then vis 2->1 (0.25/10) < ins 1->0. FLOPs 45 -> 41 -> 37 -> 27 -> 17.
    sol = search.accuracy_greedy_search(_oracle(LOSSES, calls), cost, 30)
    assert sol.depths == {VIS: 2, INS: 1} and sol.flops == 27
    assert [(s["parameter"], s["depth"]) for s in sol.stats["trace"]] == [
        ("mlp_instruction", 2), ("mlp_instruction", 1), ("mlp_vision", 2)]
    assert sol.stats["accuracy"] == pytest.approx(1 - 0.05 - 0.02) and sol.stats["dense_accuracy"] == 1
    assert sol.predicted_kl is None  # no curves given
    assert calls[0] == ["dense"] and all(c == ["mlp_instruction", "mlp_vision"] for c in calls[1:])
    assert len(calls) == 1 + sol.stats["steps"]  # one scorer call (all candidates) per step
    deeper = search.accuracy_greedy_search(_oracle(LOSSES), cost, 20)
    assert deeper.depths == {VIS: 1, INS: 1} and deeper.flops == 17
    # a coarser grid moves parameters by grid steps: 3 -> 2 -> 0
    coarse = search.accuracy_greedy_search(_oracle(LOSSES), cost, 30, grid=[0, 2, 3])
    assert coarse.depths == {VIS: 0, INS: 2} and coarse.flops == 11  # vis 2->0: 0.55/20 < ins 2->0: 0.49/8


def test_ties_least_loss_then_least_kl():
    # equal loss per FLOP (0.04/8 == 0.02/4): the smaller loss wins
    cost = _cost(per_layer=(8.0, 4.0))
    losses = {VIS: {3: 0, 2: 0.04, 1: 0.5, 0: 0.9}, INS: {3: 0, 2: 0.02, 1: 0.5, 0: 0.9}}
    sol = search.accuracy_greedy_search(_oracle(losses), cost, cost.dense - 1)
    assert sol.stats["trace"][0]["parameter"] == "mlp_instruction"
    # equal ratio and loss: the least KL increase (when curves are known) wins, else the first pair
    cost = _cost(per_layer=(4.0, 4.0))
    losses = {VIS: {3: 0, 2: 0.02, 1: 0.5, 0: 0.9}, INS: {3: 0, 2: 0.02, 1: 0.5, 0: 0.9}}
    curves = {VIS: np.array([3.0, 2.0, 0.5, 0.0]), INS: np.array([3.0, 2.0, 0.1, 0.0])}
    sol = search.accuracy_greedy_search(_oracle(losses), cost, cost.dense - 1, curves=curves)
    assert sol.stats["trace"][0]["parameter"] == "mlp_instruction" and sol.predicted_kl == pytest.approx(0.1)
    sol = search.accuracy_greedy_search(_oracle(losses), cost, cost.dense - 1)
    assert sol.stats["trace"][0]["parameter"] == "mlp_vision"


def test_infeasible_budget():
    with pytest.raises(search.InfeasibleBudgetError, match="cheapest policy this search space reaches"):
        search.accuracy_greedy_search(_oracle(LOSSES), _cost(), 2.0)  # all-pruned still costs 3


# --- wired into stage=search on a tiny LLaVA (real engine and generation) -----------------------
@pytest.fixture(scope="module")
def model_proc():
    return tiny_llava()


def _samples(n=4, answers=True):
    test = synthetic_dataset(n=n)["test"]
    return [{"id": r["id"], "image": r["image"], "question": r["question"],
             "answer": r["answer"] if answers else None} for r in test]


def _job(tmp_path, model_proc, samples):
    model, proc = model_proc
    return sweep.SweepJob(model, calibration_batches(proc, samples, 4), model_id="tiny-llava", run_dir=tmp_path,
                          pairs=[("kv", "vision"), ("mlp", "instruction")], processor=proc, samples=samples)


def _conf(run_dir, *overrides):
    return stage_conf(SearchStage, run_dir, "method.objective=accuracy", "method.check_additive=2",
                      "budget=ratio", "budget.values=[0.8,0.6]", "sweep.batch_size=4", "device=cpu", *overrides)


def test_accuracy_objective_stage_real_engine(tmp_path, model_proc, monkeypatch):
    torch.set_num_threads(1)
    model, proc = model_proc
    samples = _samples()
    from dop.evaluation.scoring import score_synthetic

    # half the reference answers are the dense model's own, so the dense accuracy is not 0
    preds = score_synthetic(model, proc, synthetic_dataset(n=4), batch_size=4)["predictions"]
    for i in (0, 2):
        samples[i]["answer"] = preds[i]
    job = _job(tmp_path, model_proc, samples)
    out = search_stage.execute(_conf(tmp_path), job=job)
    assert job.last_stats == {}  # GSOP's objective runs no sweep
    summary = json.loads((tmp_path / "search.json").read_text())
    assert summary["objective"] == "accuracy" and summary["solver"] == "greedy"  # method.solver ignored
    assert set(summary["budgets"]) == {"ratio_0.8", "ratio_0.6"} == set(out["budgets"])
    for name, entry in summary["budgets"].items():
        assert entry["ratio"] <= entry["budget"]["value"] + 1e-12
        assert entry["dense_calibration_accuracy"] == pytest.approx(0.5)
        assert 0 <= entry["calibration_accuracy"] <= 1 and entry["predicted_kl"] is None
        assert entry["measured_kl"] is not None
        policy = Policy.from_yaml(tmp_path / "policies" / f"{name}.yaml")
        assert policy == DepthPolicy.from_yaml(tmp_path / "policies" / f"{name}.yaml").expand(job.num_layers)
        assert policy.meta["objective"] == "accuracy" and policy.meta["calibration_accuracy"] is not None
    assert "additive_check" not in summary  # no sweep, no curves to check
    # the accuracy the search recorded is what the direct scorer gives for the found policy
    found = Policy.from_yaml(tmp_path / "policies" / "ratio_0.6.yaml")
    again = calibration_accuracy(model, proc, samples, {"p": found}, batch_size=4)["p"]
    assert again == pytest.approx(summary["budgets"]["ratio_0.6"]["calibration_accuracy"])


def test_missing_answers_and_unknown_objective(tmp_path, model_proc, monkeypatch):
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match="needs a reference answer"):  # the direct scorer too
        calibration_accuracy(None, None, [{"id": "a", "question": "q", "image": None}], {})
    job = _job(tmp_path, model_proc, _samples(answers=False))
    scored = []
    monkeypatch.setattr(search_stage, "calibration_accuracy", lambda *a, **k: scored.append(1))
    with pytest.raises(ValueError, match="needs a reference answer for every calibration sample"):
        search_stage.execute(_conf(tmp_path), job=job)
    assert not scored  # failed before any generation
    with pytest.raises(ConfigError, match="method.objective='f1' is not valid; valid: kl, accuracy"):
        _conf(tmp_path, "method.objective=f1")
