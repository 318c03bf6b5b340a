"""method=dop_paper, the paper's main form (attention and MLP depth on the visual tokens + n_v through
the model family's front end), on tiny random models of the four families the main table covers:
the search finds a policy, the engine applies it with its front end, and its FLOPs are counted.

The front end of each family is read from the real model's config (conf/model/*.yaml: ``front_end``),
so these tests run the pairing the main table runs (VisPruner on LLaVA-1.5 / LLaVA-NeXT / InternVL3,
input resizing on Qwen2.5-VL).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from stage_configs import stage_conf
from tiny_models import BUILDERS

import dop.stages.search as search_stage
from dop.adapters import get_adapter
from dop.divergence import CalibrationBatch
from dop.engine import prune
from dop.engine.front_end import reduce_inputs
from dop.flops import count_flops
from dop.ops import VISION
from dop.policy import DepthPolicy, Policy
from dop.stages import CONF_DIR
from dop.stages.config import SearchStage
from dop.stages.sweep import configured_pairs
from dop.sweep import SweepJob

# tiny family -> the real model whose front end it stands for, and the builder's keywords
FAMILIES = {"llava": ("llava15_7b", {}), "llava_next": ("llava_next_7b", {"crop": 56}),
            "qwen2_5_vl": ("qwen25vl_7b", {}), "internvl": ("internvl3_8b", {})}


def front_end_of(model_name: str) -> str:
    return str(OmegaConf.load(Path(CONF_DIR) / "model" / f"{model_name}.yaml").front_end)


def _batch(inputs) -> CalibrationBatch:
    B, T = inputs["input_ids"].shape
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, -1] = True  # the first answer position (method.response_tokens=1)
    return CalibrationBatch(dict(inputs), mask, [f"s{i}" for i in range(B)])


def _layer0_visual_rows(model, inputs, pruner) -> list[int]:
    """Visual rows of each sample that reach decoder layer 0 (kept as queries there)."""
    vision = get_adapter(model).token_groups(inputs["input_ids"], inputs.get("attention_mask"))[VISION]
    return (pruner.kept_masks[0]["q"] & vision).sum(1).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dop_paper_finds_applies_and_counts_with_its_front_end(family, tmp_path):
    torch.set_num_threads(1)
    model_name, kw = FAMILIES[family]
    reducer = front_end_of(model_name)
    assert reducer == ("resize" if family == "qwen2_5_vl" else "vispruner")
    model, make = BUILDERS[family](attn="sdpa", layers=4, **kw)
    inputs = dict(make(2, seed=1))
    conf = stage_conf(SearchStage, tmp_path, "method=dop_paper", f"method.reducer={reducer}")
    assert conf.method.name == "dop_paper" and conf.method.types == ["attn", "mlp"] and conf.method.groups == [VISION]
    pairs = configured_pairs(conf.method)
    assert sorted(pairs) == [("attn", VISION), ("mlp", VISION)]
    job = SweepJob(model, [_batch(inputs)], model_id=f"tiny-{family}", run_dir=tmp_path, pairs=pairs,
                   n_v=conf.method.n_v, reducer=reducer)
    full = job.nv_full
    assert full == max(get_adapter(model).token_groups(inputs["input_ids"], inputs["attention_mask"])[VISION]
                       .sum(1).tolist())
    assert len(job.nv_grid) >= 3 and job.nv_grid[-1] == full  # fractions of the image's tokens, and full

    groups = job.flops_groups()
    dense = count_flops(job.text_config, groups)
    # budgets between dense and the floor of this space (every visual operation pruned from layer 0)
    floor = count_flops(job.text_config, groups, DepthPolicy({"attn/vision": 0, "mlp/vision": 0})
                        .expand(job.num_layers)) / dense
    budgets = [round(floor + f * (1 - floor), 4) for f in (0.6, 0.2)]
    conf = stage_conf(SearchStage, tmp_path, "method=dop_paper", f"method.reducer={reducer}", "budget=ratio",
                      f"budget.values=[{budgets[0]},{budgets[1]}]")
    out = search_stage.execute(conf, job=job)  # finds: the sweep (depths + n_v curve) and the joint solve
    assert out["n_v"]["reducer"] == reducer
    assert set(out["n_v"]["curve"]) == {str(v) for v in job.nv_grid}
    for name, entry in out["budgets"].items():
        policy = Policy.from_yaml(tmp_path / "policies" / f"{name}.yaml")
        assert policy.n_v == entry["n_v"] and (entry["n_v"] is None or entry["reducer"] == reducer)
        assert set(entry["n_v_candidates"]) == {str(v) for v in job.nv_grid}  # every n_v was solved for
        cands = [v for v in entry["n_v_candidates"].values() if v is not None]
        assert entry["predicted_kl"] == pytest.approx(min(cands))
        # counts: the recorded FLOPs are the exact count of the expanded policy, within the budget
        assert entry["flops"] == pytest.approx(count_flops(job.text_config, groups, policy))
        assert entry["flops"] <= entry["budget"]["value"] * dense * (1 + 1e-9)
        assert entry["measured_kl"] == pytest.approx(job.measure_kl(policy), rel=1e-6, abs=1e-9)
        assert policy.meta["calibration"]["num_samples"] == 2
        assert policy.meta["calibration"]["group_sizes"][VISION] > 0

    # applies: a policy with the front end at a reduced n_v, depths from the search space
    n_v = job.nv_grid[-2]  # the largest reduced count
    policy = DepthPolicy({"attn/vision": 2, "mlp/vision": 3}, n_v=n_v, reducer=reducer).expand(job.num_layers)
    with torch.no_grad(), prune(model, policy) as pruner:
        reduced = reduce_inputs(model, inputs, policy)
        logits = model(**reduced).logits
        rows = _layer0_visual_rows(model, reduced, pruner)
    assert torch.isfinite(logits).all()
    if reducer == "resize":  # a smaller image: at most n_v visual tokens per image
        assert all(0 < r <= n_v for r in rows)
    else:  # token selection: exactly n_v of each image's visual rows reach layer 0
        assert rows == [n_v, n_v]
    assert count_flops(job.text_config, groups, policy) < count_flops(
        job.text_config, groups, DepthPolicy({"attn/vision": 2, "mlp/vision": 3}).expand(job.num_layers))
