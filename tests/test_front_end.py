"""DOP's n_v front end: policy field, FLOPs, the engine on the reduced prompt (against a hand-built
reference), the sweep's n_v curve, and the joint (depths, n_v) search against brute force."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from reference import reference_groups, reference_prune
from stage_configs import stage_conf
from test_sweep_store import tiny_job, tiny_model
from tiny_models import BUILDERS, IDS

import dop.stages.search as search_stage
import dop.sweep as sweep
from dop.adapters import get_adapter
from dop.engine import EngineError, prune
from dop.engine.baselines import MethodError, get_method
from dop.engine.baselines.vispruner import vispruner_select
from dop.engine.front_end import nv_values, reduce_inputs, reducer_of
from dop.flops import count_flops
from dop.policy import DepthPolicy, Policy, PolicyError
from dop.search import CostModel, InfeasibleBudgetError, Solution, solve_exact, solve_joint
from dop.stages.config import SearchStage
from dop.stages.schema import ConfigError

N_PATCH = 16  # the tiny LLaVA of tests/tiny_models.py: 56 px / 14 px patches


@pytest.fixture(scope="module")
def llava():
    return BUILDERS["llava"](attn="eager", layers=4)


# --------------------------------------------------------------------------------------------
# The policy field
# --------------------------------------------------------------------------------------------
def test_policy_front_end_fields_round_trip():
    dp = DepthPolicy({"kv/vision": 2, "attn/system": 3}, num_layers=4, n_v=8)
    assert dp.reducer == "vispruner" and "n_v=8" in repr(dp)
    pol = dp.expand()
    assert pol.n_v == 8 and pol.reducer == "vispruner" and not pol.is_identity
    assert Policy.from_yaml(pol.to_yaml()) == pol
    assert DepthPolicy.from_yaml(pol.to_yaml()) == dp
    assert DepthPolicy.from_dict(dp.to_dict()) == dp
    same_ops = DepthPolicy({"kv/vision": 2, "attn/system": 3}, num_layers=4).expand()
    assert same_ops != pol and same_ops.digest() != pol.digest()
    assert Policy(n_v=8) != Policy(n_v=4) and Policy(n_v=8, reducer="divprune") != Policy(n_v=8)
    assert Policy().is_identity and not Policy(n_v=16).is_identity
    assert (Policy(n_v=8) | pol).n_v == 8
    with pytest.raises(PolicyError, match="different front ends"):
        Policy(n_v=8) | Policy(n_v=4)
    with pytest.raises(PolicyError, match="n_v must be a non-negative int"):
        Policy(n_v=-1)
    with pytest.raises(PolicyError, match="without n_v"):
        DepthPolicy({}, reducer="vispruner")
    with pytest.raises(PolicyError, match="in_llm method; n_v needs a pre-LLM reducer"):
        reducer_of(Policy(n_v=4, reducer="fastv"))
    with pytest.raises(MethodError, match="unknown method 'nope'"):
        reducer_of(Policy(n_v=4, reducer="nope"))
    assert nv_values([12, 4, 99, 4], 16) == [4, 12, 16] and nv_values(None, 16) == []
    assert nv_values([1.0, 0.5, 0.25], 16) == [4, 8, 16] and nv_values([0.333, 0.111], 576) == [64, 192, 576]
    with pytest.raises(PolicyError, match="fractions in"):
        nv_values([1.5], 16)


def test_flops_count_the_kept_visual_tokens():
    cfg = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    groups = {"system": 35, "vision": 576, "instruction": 100}
    for n_v in (576, 192, 64, 0):
        assert count_flops(cfg, groups, Policy(n_v=n_v)) == count_flops(cfg, {**groups, "vision": n_v})
    dp = DepthPolicy({"kv/vision": 2, "mlp/instruction": 20}, n_v=128)
    assert count_flops(cfg, groups, dp) == count_flops(cfg, {**groups, "vision": 128}, DepthPolicy(dp.depths))
    # two images: n_v per image
    two = {**groups, "vision": 1152}
    assert count_flops(cfg, two, Policy(n_v=64), num_images=2) == count_flops(cfg, {**groups, "vision": 128})
    assert count_flops(cfg, groups, Policy(n_v=1000)) == count_flops(cfg, groups)  # capped, never grown


# --------------------------------------------------------------------------------------------
# The engine on the reduced prompt
# --------------------------------------------------------------------------------------------
def _hand_reduced(model, inputs, k):
    """VisPruner by hand from an eager tower's attention map, then the prompt built as embeddings."""
    cfg = model.config
    with torch.no_grad():
        outs = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        layer = cfg.vision_feature_layer
        cls_row = outs.attentions[layer][:, :, 0, 1:]  # the layer whose output is hidden_states[layer]
        feats = outs.hidden_states[layer][:, 1:]
        kept = vispruner_select(cls_row, feats, k, 0.5)
        tokens = model.model.multi_modal_projector(feats.gather(1, kept[..., None].expand(-1, -1, feats.shape[-1])))
    ids = inputs["input_ids"][0]
    is_img = ids == cfg.image_token_id
    first = int(is_img.nonzero()[0])
    short = torch.cat([ids[: first + k], ids[first + int(is_img.sum()):]]).unsqueeze(0)
    emb = model.get_input_embeddings()(short).clone()
    emb[0, first : first + k] = tokens[0]
    return short, emb, kept


@pytest.mark.parametrize("seed", [0, 1])
def test_nv_policy_equals_hand_built_reference(llava, seed):
    model, make = llava
    adapter = get_adapter(model)
    inputs = dict(make(batch=1, seed=seed))
    k = 7
    rng = np.random.default_rng(seed)
    depths = {f"{t}/{g}": int(rng.integers(0, 5)) for t in ("q", "kv", "mlp") for g in ("system", "vision")}
    policy = DepthPolicy(depths, n_v=k).expand(4)
    with torch.no_grad(), prune(model, policy) as pruner:
        reduced = reduce_inputs(model, inputs, policy)
        ours = model(**reduced).logits
    assert int((reduced["input_ids"] == IDS["<image>"]).sum()) == k
    assert reducer_of(policy).last_selection is not None
    short, emb, kept = _hand_reduced(model, inputs, k)
    assert reducer_of(policy).last_selection.tolist() == kept.tolist()
    assert torch.equal(reduced["input_ids"], short)
    mask = torch.ones_like(short)
    groups = reference_groups(short, mask, adapter.vision_token_ids())
    assert int(groups["vision"].sum()) == k
    with torch.no_grad(), reference_prune(model, adapter.decoder_layers(), policy, groups, mask.bool()):
        ref = model(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # the engine ran on k visual rows: layer 0's kv side saw exactly the prompt's rows
    assert pruner.kept_masks[0]["kv"].shape[1] == short.shape[1]
    assert not model.model.multi_modal_projector._forward_hooks  # hooks removed on exit


def test_nv_policy_without_ops_is_the_vispruner_baseline(llava):
    model, make = llava
    inputs = dict(make(batch=2, seed=3))
    k = 5
    policy = Policy(n_v=k)
    base = get_method("vispruner")
    with torch.no_grad():
        with prune(model, policy):
            ours = model(**reduce_inputs(model, inputs, policy)).logits
            gen = model.generate(**reduce_inputs(model, inputs, policy), max_new_tokens=3, do_sample=False)
        with base.apply(model, k):
            theirs = model(**base.reduce_inputs(model, inputs, k)).logits
            gen_ref = model.generate(**base.reduce_inputs(model, inputs, k), max_new_tokens=3, do_sample=False)
    assert torch.equal(ours, theirs) and torch.equal(gen, gen_ref)


def test_batch_with_left_padding_equals_per_sample(llava):
    model, make = llava
    policy = DepthPolicy({"kv/vision": 1, "mlp/system": 2}, n_v=6).expand(4)
    batch = dict(make(batch=3, seed=5))
    assert bool((batch["attention_mask"][:, 0] == 0).any())  # really left-padded
    with torch.no_grad(), prune(model, policy):
        reduced = reduce_inputs(model, batch, policy)
        together = model(**reduced).logits[:, -1]
        alone = []
        for b in range(3):
            row = batch["attention_mask"][b].bool()
            single = {"input_ids": batch["input_ids"][b][row][None], "attention_mask": batch["attention_mask"][b][row][None],
                      "pixel_values": batch["pixel_values"][b : b + 1]}
            alone.append(model(**reduce_inputs(model, single, policy)).logits[0, -1])
    torch.testing.assert_close(together, torch.stack(alone), atol=1e-5, rtol=0)


def test_unprepared_inputs_and_prefix_are_refused(llava):
    model, make = llava
    inputs = dict(make(batch=1, seed=0))
    with pytest.raises(MethodError, match="reduce_inputs"), torch.no_grad(), prune(model, Policy(n_v=4)):
        model(**inputs)
    with pytest.raises(EngineError, match="prefix= cannot serve a policy with n_v"):
        with prune(model, Policy(n_v=4), prefix=(1, torch.zeros(1, 3, 8))):
            pass
    assert not model.model.multi_modal_projector._forward_hooks


# --------------------------------------------------------------------------------------------
# The sweep's n_v curve
# --------------------------------------------------------------------------------------------
def _kl_by_hand(model, batches, k):
    """KL(dense || VisPruner at k) at each sample's last position, through the baseline itself."""
    base = get_method("vispruner")
    out = []
    with torch.no_grad():
        for batch in batches:
            dense = torch.log_softmax(model(**batch.inputs).logits[:, -1].double(), -1)
            with base.apply(model, k):
                red = torch.log_softmax(model(**base.reduce_inputs(model, batch.inputs, k)).logits[:, -1].double(), -1)
            out.extend((dense.exp() * (dense - red)).sum(-1).tolist())
    return out


def test_sweep_measures_the_nv_curve_and_resumes(tmp_path):
    torch.set_num_threads(1)
    job = tiny_job(tmp_path, layers=3, pairs=[("kv", "vision")], n_v=[12, 4, 16])
    assert job.nv_full == N_PATCH and job.nv_grid == [4, 12, 16]
    nv_points = [p for p in job.points() if isinstance(p, sweep.NvPoint)]
    assert [p.n_v for p in nv_points] == [4, 12]  # the full count is dense: not run
    stats = job.run()
    assert stats["computed"] == len(job.points())
    assert (tmp_path / "sweep" / "n_v_vispruner" / "4.json").exists()
    doc = json.loads((tmp_path / "sweep" / "n_v_vispruner" / "4.json").read_text())
    assert doc["type"] == "n_v" and doc["n_v"] == 4 and doc["reducer"] == "vispruner"
    model, _ = tiny_model(3)
    for k in (4, 12):
        hand = _kl_by_hand(model, job.reference.batches, k)
        rec = job.store.read(sweep.NvPoint("vispruner", k))
        np.testing.assert_allclose(rec["kl_per_sample"], hand, rtol=1e-4, atol=1e-6)
    curve = job.nv_curve()
    assert curve[16] == 0.0 and curve[4] > 0 and set(curve) == {4, 12, 16}
    assert set(job.store.points()) >= set(nv_points)
    assert job.run()["computed"] == 0  # resume: every point present
    # a joint policy's measured KL runs the front end too (and differs from either part alone)
    joint = DepthPolicy({("kv", "vision"): 1}, n_v=4).expand(3)
    kl = job.measure_kl(joint)
    assert kl > 0 and kl != pytest.approx(curve[4]) and kl != pytest.approx(job.measure_kl(DepthPolicy(
        {("kv", "vision"): 1}).expand(3)))


def test_merge_expects_the_nv_points(tmp_path):
    torch.set_num_threads(1)
    for k in range(2):
        tiny_job(tmp_path / f"s{k}", layers=3, pairs=[("kv", "vision")], n_v=[8], shard=k, num_shards=2).run()
    target = sweep.SweepStore(tmp_path / "merged")
    report = sweep.merge_stores(target, [tmp_path / "s0", tmp_path / "s1"])
    assert report["complete"] and target.has(sweep.NvPoint("vispruner", 8))
    points = tiny_job(tmp_path / "x", layers=3, pairs=[("kv", "vision")], n_v=[8]).points()
    owner = points.index(sweep.NvPoint("vispruner", 8)) % 2
    partial = sweep.merge_stores(sweep.SweepStore(tmp_path / "half"), [tmp_path / f"s{1 - owner}"])
    assert not partial["complete"] and "n_v_vispruner/8" in partial["missing"]


# --------------------------------------------------------------------------------------------
# The joint search
# --------------------------------------------------------------------------------------------
def _brute_joint(kl, nv_curve, cost_at, budget):
    best = None
    for v in sorted(nv_curve, reverse=True):
        cost = cost_at(v)
        for depths in itertools.product(range(cost.num_layers + 1), repeat=len(cost.pairs)):
            c = cost.cost(depths)
            if c > budget * (1 + 1e-12):
                continue
            total = float(sum(kl[j, d] for j, d in enumerate(depths))) + nv_curve[v]
            if best is None or total < best[0] - 1e-12:
                best = (total, v, depths)
    return best


def test_solve_joint_equals_brute_force():
    text = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4)
    groups = {"system": 5, "vision": 16, "instruction": 7}
    pairs = [("kv", "vision"), ("mlp", "vision"), ("attn", "system")]
    costs = {v: CostModel.from_flops(text, {**groups, "vision": v}, pairs) for v in (4, 8, 12, 16)}
    dense = costs[16].dense
    rng = np.random.default_rng(0)
    chose_nv = chose_full = 0
    for _ in range(40):
        kl = np.sort(rng.gamma(1.0, 1.0, size=(len(pairs), 5)), axis=1)[:, ::-1].copy()
        kl[:, -1] = 0.0  # depth L: dense
        nv_curve = {16: 0.0, **{v: float(x) for v, x in zip((12, 8, 4), np.sort(rng.gamma(1.0, 1.5, 3)))}}
        budget = dense * rng.uniform(0.15, 0.9)
        want = _brute_joint(kl, nv_curve, costs.__getitem__, budget)
        if want is None:
            with pytest.raises(InfeasibleBudgetError):
                solve_joint(solve_exact, kl, nv_curve, costs.__getitem__, budget, full=16)
            continue
        got = solve_joint(solve_exact, kl, nv_curve, costs.__getitem__, budget, full=16, reducer="vispruner")
        assert got.predicted_kl == pytest.approx(want[0], abs=1e-9)
        n_v = 16 if got.n_v is None else got.n_v
        assert got.flops <= budget * (1 + 1e-12) and costs[n_v].cost(got.depths) == pytest.approx(got.flops)
        assert got.stats["depth_kl"] + got.stats["n_v_kl"] == pytest.approx(got.predicted_kl)
        assert (got.n_v is None) == (got.reducer is None)
        chose_nv += got.n_v is not None
        chose_full += got.n_v is None
    assert chose_nv and chose_full  # both outcomes exercised


def test_solve_joint_full_count_is_no_front_end():
    sol = Solution({("kv", "vision"): 2}, 0.1, 1.0)
    out = solve_joint(lambda c, cost, b: sol, None, {16: 0.0, 8: 0.5}, lambda v: None, 1.0, full=16, reducer="x")
    assert out.n_v is None and out.depth_policy(4).n_v is None and out.predicted_kl == 0.1


def _conf(run_dir, budgets, *overrides):
    values = ",".join(str(b) for b in budgets)
    return stage_conf(SearchStage, run_dir, "method.check_additive=3", "method.n_v=[8,4]", "budget=ratio",
                      f"budget.values=[{values}]", *overrides)


def test_search_stage_solves_depths_and_nv_jointly(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    job = tiny_job(tmp_path, layers=3, pairs=[("mlp", "vision"), ("kv", "system")], n_v=[8, 4])
    groups = job.flops_groups()
    cheapest_full = CostModel.from_flops(job.text_config, groups, job.pairs)
    # below this only a front end reaches (vision's attention is never pruned by these pairs)
    floor = cheapest_full.cost([0, 0]) / cheapest_full.dense
    out = search_stage.execute(_conf(tmp_path, [0.9, round(floor * 0.97, 4)]), job=job)
    assert out["n_v"]["reducer"] == "vispruner" and set(out["n_v"]["curve"]) == {"4", "8", "16"}
    low = out["budgets"][f"ratio_{round(floor * 0.97, 4)}"]
    assert low["n_v"] in (4, 8) and low["reducer"] == "vispruner"  # depths alone cannot reach it
    for name, entry in out["budgets"].items():
        cands = {k: v for k, v in entry["n_v_candidates"].items() if v is not None}
        best = min(cands.values())
        assert entry["predicted_kl"] == pytest.approx(best)
        assert entry["ratio"] <= entry["budget"]["value"] + 1e-12
        policy = Policy.from_yaml(tmp_path / "policies" / f"{name}.yaml")
        assert policy.n_v == entry["n_v"] and DepthPolicy.from_yaml(tmp_path / "policies" / f"{name}.yaml").n_v == entry["n_v"]
        assert entry["flops"] == pytest.approx(count_flops(job.text_config, groups, policy))
        assert entry["measured_kl"] == pytest.approx(job.measure_kl(policy), rel=1e-6)
    assert out["additive_check"]["n"] == 3
    with pytest.raises(ConfigError, match="KL objective"):
        search_stage.execute(_conf(tmp_path, [0.9], "method.objective=accuracy"), job=job)


# --------------------------------------------------------------------------------------------
# Qwen2-VL: the prompt keeps its placeholders, the reducer's selector drops rows before layer 0
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen():
    return BUILDERS["qwen2_vl"](attn="sdpa")[0]


def test_nv_policy_on_qwen2_vl(qwen, tmp_path):
    from test_baselines_prellm_qwen import make_inputs

    from dop.divergence import CalibrationBatch

    torch.set_num_threads(1)
    inputs = make_inputs(2, seed=1)  # 16 and 24 visual tokens
    k = 5
    base = get_method("vispruner")
    with torch.no_grad():
        with base.apply(qwen, k):
            theirs = qwen(**base.reduce_inputs(qwen, inputs, k)).logits
        with prune(qwen, Policy(n_v=k)) as pruner:
            ours = qwen(**reduce_inputs(qwen, inputs, Policy(n_v=k))).logits
        assert torch.equal(ours, theirs)
        assert pruner.kept_masks[0]["kv"].sum(1).tolist() == [
            int(m.sum()) - n + k for m, n in zip(inputs["attention_mask"], (16, 24))]
        policy = DepthPolicy({"kv/vision": 1, "mlp/instruction": 2}, n_v=k).expand(4)
        with prune(qwen, policy):
            gen = qwen.generate(**reduce_inputs(qwen, inputs, policy), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    # the sweep: n_v's full count comes from the calibration set; its curve is measured
    B, T = inputs["input_ids"].shape
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, -1] = True
    job = sweep.SweepJob(qwen, [CalibrationBatch(inputs, mask, ["a", "b"])], model_id="tiny-qwen",
                         run_dir=tmp_path, pairs=[("kv", "vision")], n_v=[8, 0.25])
    assert job.nv_full == 24 and job.nv_grid == [6, 8, 24]
    job.run()
    curve = job.nv_curve()
    assert curve[24] == 0.0 and curve[6] > 0 and curve[8] > 0
