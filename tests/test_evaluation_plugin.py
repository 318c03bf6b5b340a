"""The lmms-eval plugin: simple_evaluate == dop's own loop (dense and pruned), loglikelihood by hand."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("lmms_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evaluation_fixtures import synthetic_dataset, tiny_llava  # noqa: E402

from dop.evaluation import scoring  # noqa: E402
from dop.evaluation.plugin import DopLMM, manifest  # noqa: E402
from dop.evaluation.tasks import TASK_NAME, write_task_dir  # noqa: E402


@pytest.fixture(scope="module")
def model_proc():
    return tiny_llava()


@pytest.fixture(scope="module")
def task_env(tmp_path_factory, model_proc):
    """A synthetic dataset on disk whose answers half match the dense model (so accuracy is not 0)."""
    model, proc = model_proc
    ds = synthetic_dataset(n=10)
    preds = scoring.score_synthetic(model, proc, ds, batch_size=4)["predictions"]
    test = ds["test"]
    answers = [p if i % 2 == 0 else a for i, (p, a) in enumerate(zip(preds, test["answer"]))]
    ds["test"] = test.remove_columns("answer").add_column("answer", answers)
    root = tmp_path_factory.mktemp("synthetic")
    ds.save_to_disk(str(root / "data"))
    return root / "data", write_task_dir(root / "data", root / "tasks")


def _simple_evaluate(lm, task_dir, limit=None):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    tm = TaskManager("WARNING", include_path=str(task_dir), model_name="dop")
    return simple_evaluate(model=lm, tasks=[TASK_NAME], limit=limit, task_manager=tm, log_samples=True,
                           verbosity="WARNING", bootstrap_iters=0)


def test_simple_evaluate_equals_direct_loop_dense(model_proc, task_env):
    model, proc = model_proc
    data, tasks = task_env
    direct = scoring.score_synthetic(model, proc, data, batch_size=4)
    res = _simple_evaluate(DopLMM.from_model(model, proc, batch_size=4), tasks)
    assert direct["accuracy"] >= 0.5
    assert res["results"][TASK_NAME]["exact_match,none"] == pytest.approx(direct["accuracy"], abs=0)
    answers = [s["filtered_resps"][0] for s in res["samples"][TASK_NAME]]
    assert answers == direct["predictions"]


def test_simple_evaluate_equals_direct_loop_pruned(model_proc, task_env):
    pytest.importorskip("dop.engine")
    from dop.ops import Operation
    from dop.policy import Policy

    model, proc = model_proc
    data, tasks = task_env
    policy = Policy([Operation(layer, "vision", t) for layer in (0, 1) for t in ("q", "kv", "mlp")])
    dense = scoring.score_synthetic(model, proc, data, batch_size=4, limit=6)
    direct = scoring.score_synthetic(model, proc, data, policy=policy, batch_size=4, limit=6)
    assert direct["predictions"] != dense["predictions"]  # the policy changes the model's answers
    res = _simple_evaluate(DopLMM.from_model(model, proc, policy=policy, batch_size=4), tasks, limit=6)
    assert res["results"][TASK_NAME]["exact_match,none"] == pytest.approx(direct["accuracy"], abs=0)
    assert [s["filtered_resps"][0] for s in res["samples"][TASK_NAME]] == direct["predictions"]


class _Req:
    def __init__(self, args):
        self.args = args


def test_loglikelihood_is_summed_logprob(model_proc):
    """Value = -(sum of log_softmax over the continuation tokens), from an unpadded forward by hand."""
    model, proc = model_proc
    ds = synthetic_dataset(n=2)["test"]
    lm = DopLMM.from_model(model, proc, batch_size=2)
    lm.task_dict = {"t": {"test": ds}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    reqs = [_Req(("what is the colour of the object ?", " red blue", visual, 0, "t", "test")),
            _Req(("how many ?", " two", visual, 1, "t", "test"))]
    out = lm.loglikelihood(reqs)
    for req, res in zip(reqs, out):
        value, greedy = res.text
        context, cont, _, doc_id, _, _ = req.args
        prompt = scoring.build_prompt(proc, context)
        full = proc(images=[ds[doc_id]["image"]], text=[prompt + cont], return_tensors="pt")
        n_ctx = proc(images=[ds[doc_id]["image"]], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        with torch.no_grad():
            logits = model(**full).logits[0]
        ids = full["input_ids"][0]
        logp = torch.log_softmax(logits.float(), -1)
        hand = sum(logp[t - 1, ids[t]].item() for t in range(n_ctx, len(ids)))
        assert len(ids) - n_ctx == len(cont.split())
        assert value == pytest.approx(-hand, abs=1e-4)
        assert greedy == all(logp[t - 1].argmax().item() == ids[t].item() for t in range(n_ctx, len(ids)))


def test_generate_until_respects_until_and_max_new_tokens(model_proc):
    model, proc = model_proc
    ds = synthetic_dataset(n=3)["test"]
    lm = DopLMM.from_model(model, proc, batch_size=2)
    lm.task_dict = {"t": {"test": ds}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    free = lm.generate_until([_Req((ds[i]["question"], {"max_new_tokens": 4, "until": []}, visual, i, "t", "test"))
                              for i in range(3)])
    assert all(1 <= len(t.split()) <= 4 for t in free)
    stop = free[0].split()[1]
    cut = lm.generate_until([_Req((ds[0]["question"], {"max_new_tokens": 4, "until": [stop]}, visual, 0, "t", "test"))])
    assert cut[0] == free[0].split(stop)[0].strip()
    one = lm.generate_until([_Req((ds[0]["question"], {"max_new_tokens": 1, "until": ["\n"]}, visual, 0, "t", "test"))])
    assert one[0] == free[0].split()[0]


def test_unknown_method_and_multi_round(model_proc):
    model, proc = model_proc
    with pytest.raises(ValueError, match="valid methods: dense, policy"):
        DopLMM.from_model(model, proc, method="fastvv")
    with pytest.raises(ValueError, match="needs policy"):
        DopLMM.from_model(model, proc, method="policy")
    with pytest.raises(NotImplementedError):
        DopLMM.from_model(model, proc).generate_until_multi_round([])


def test_manifest_and_entry_point():
    from importlib.metadata import entry_points

    m = manifest()
    assert m.model_id == "dop"
    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "dop"]
    assert eps and eps[0].value == "dop.evaluation.plugin:manifest"
    from lmms_eval.models import get_model

    assert get_model("dop") is DopLMM
