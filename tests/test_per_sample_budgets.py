"""Equal TFLOPs per evaluated sample (issue 16) on tiny random Qwen2-VL and LLaVA-NeXT, images of 3 sizes.

For DOP and every baseline the model supports, at 3 budgets (two shares of dense and one token budget:
``k`` per image on Qwen2-VL, per crop on LLaVA-NeXT), each sample is resolved on its own group sizes
(``SampleMatcher`` / ``ShapeSolver``, the code the evaluate stage runs) and checked against
independent numbers:

- the sample's budget, recomputed by hand from ``dop.flops`` on its own group sizes;
- every candidate knob's FLOPs from ``Method.schedule`` through ``count_flops`` (not the matcher's
  per-layer shortcut): the chosen knob is at most the budget and within one knob step of it (no knob
  costs more and still fits), or, when even the cheapest knob exceeds the budget, the cell is named
  unreachable and runs the cheapest;
- FlopCounterMode on the engine run of that sample: equal to the count for DOP, VTW and the pre-LLM
  reducers (input resizing: at most, its count is an upper bound); for the in-LLM methods equal per
  layer in the attention kernel, the value and output projections and the MLP, and at least the
  count in the q and k projections, which their selectors also call to score tokens (outside the
  dop convention, as in the papers; the overhead is printed).
- DOP: its policy re-solved on the sample's sizes (exact solver, synthetic decreasing KL curves) is at
  most the budget and no single one-layer deepening of any parameter still fits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import BUILDERS, _texts, tokenizer
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig

from dop.adapters import get_adapter
from dop.budget import Budget
from dop.engine.baselines import METHODS, MethodError, get_method
from dop.engine.baselines.budget import SampleMatcher, match_budget, nominal_match, sample_budget_flops
from dop.evaluation import scoring
from dop.flops import count_flops, flops_breakdown, flops_for_tokens, register_cpu_sdpa_flops, text_shape
from dop.policy import DepthPolicy
from dop.search import InfeasibleBudgetError
from dop.search.per_shape import ShapeSolver
from dop.space import all_pairs

QWEN_SIZES = [(56, 112), (112, 112), (112, 168)]  # 2x4, 4x4, 4x6 merged tokens: 8, 16, 24 rows
NEXT_SIZES = [(56, 80), (112, 112), (90, 56)]  # 56-px crops: 3, 5, 3 crops; 44, 88, 46 rows
NEXT_CROPS = [3, 5, 3]
# (ratio, ratio, tokens): k per image on Qwen2-VL; per crop on LLaVA-NeXT (32 of the 5 x 16 rows of a
# full 5-crop image, so a 3-crop image gets 32 * 3/5)
BUDGETS = {"qwen2_vl": [Budget("ratio", 0.75), Budget("ratio", 0.5), Budget("tokens", 6)],
           "llava_next": [Budget("ratio", 0.75), Budget("ratio", 0.5), Budget("tokens", 32)]}
_BUILT: dict = {}


def _qwen_processor():
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor  # noqa: PLC0415 - as tiny_models does

    class ImageOnly(Qwen2VLProcessor):  # no torchvision: drop the video slot
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    ip = Qwen2VLImageProcessorPil(min_pixels=28 ** 2, max_pixels=112 * 168, patch_size=14, temporal_patch_size=2,
                                  merge_size=2)
    return ImageOnly(image_processor=ip, tokenizer=tokenizer())


def built(family: str):
    """(model, [(inputs, (h, w)) for each of the 3 image sizes]), batch 1 each."""
    if family not in _BUILT:
        rng = np.random.default_rng(0)
        if family == "qwen2_vl":
            model, _ = BUILDERS["qwen2_vl"](attn="sdpa")
            proc = _qwen_processor()
            samples = []
            for i, hw in enumerate(QWEN_SIZES):
                text = _texts(1, i, "<|im_start|> {sys} <|vision_start|> <|image_pad|> <|vision_end|> {q} "
                                    "<|im_end|> <|im_start|> assistant")
                image = Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8))
                samples.append((dict(proc(images=[image], text=text, return_tensors="pt")), hw))
        else:
            model, make_inputs = BUILDERS["llava_next"](attn="sdpa", crop=56)
            samples = [(dict(make_inputs(1, i, sizes=[hw])), hw) for i, hw in enumerate(NEXT_SIZES)]
        _BUILT[family] = model, samples
    return _BUILT[family]


def groups_of(model, inputs) -> dict[str, int]:
    masks = get_adapter(model).token_groups(inputs["input_ids"], inputs.get("attention_mask"))
    return {g: int(m[0].sum()) for g, m in masks.items()}


def decoder_flops(model, inputs, method=None, knob=None, policy=None) -> list[dict[str, int]]:
    """FlopCounterMode's counts per decoder layer of one engine run of ``inputs``: the layer's
    ``total`` and its components (the projections and the MLP by module, ``attn`` = the SDPA kernel)."""
    register_cpu_sdpa_flops()
    prefix = f"{type(model).__name__}.model.language_model.layers"
    with torch.no_grad():
        x = scoring.reduce_batch(model, inputs, method, knob, policy)
        with scoring.running(model, policy, method, knob), FlopCounterMode(display=False) as counter:
            model(**x)
    counts = counter.get_flop_counts()

    def total(key: str) -> int:
        return sum(counts.get(key, {}).values())

    out = []
    for i in range(text_shape(model.config).num_layers):
        layer = f"{prefix}.{i}"
        sdpa = [n for op, n in counts.get(layer, {}).items() if "scaled_dot_product" in str(op)]
        out.append({"total": total(layer), "attn": sum(sdpa), "mlp": total(f"{layer}.mlp"),
                    **{c: total(f"{layer}.self_attn.{c}_proj") for c in "qkvo"}})
    return out


def predicted_layers(model, groups, schedule=None, policy=None) -> list[dict[str, float]]:
    return [{"total": lf.total, "attn": lf.qk + lf.av, "mlp": lf.mlp, "q": lf.q, "k": lf.k, "v": lf.v, "o": lf.o}
            for lf in flops_breakdown(model.config, groups, policy, schedule=schedule).layers]


def hand_budget(family: str, budget: Budget, model, groups: dict[str, int], sample: int) -> float:
    """The sample's budget from dop.flops on its own sizes (the issue's definitions)."""
    dense = count_flops(model.config, groups)
    if budget.kind == "ratio":
        return budget.value * dense
    units = 1 if family == "qwen2_vl" else NEXT_CROPS[sample] / 5
    return flops_for_tokens(model.config, groups, budget.value * units)


def supported(family: str) -> list[str]:
    model, _ = built(family)
    names = []
    for name in sorted(METHODS):
        try:
            get_method(name).check_model(model)
        except MethodError:  # e.g. TRIM/CDPruner need a CLIP text tower; resize is Qwen-only
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_every_baseline_sample_at_or_just_below_its_own_budget(family):
    model, samples = built(family)
    cfg, L = model.config, text_shape(model.config).num_layers
    adapter = get_adapter(model)
    names = supported(family)
    assert len(names) >= 10  # 5 in-LLM + the reducers the family supports
    unreachable, checked, overhead = [], 0, 0.0
    for name in names:
        method = get_method(name)
        for budget in BUDGETS[family]:
            matcher = SampleMatcher(method, cfg, budget)
            for i, (inputs, hw) in enumerate(samples):
                groups = groups_of(model, inputs)
                units = adapter.budget_units([hw])
                target = hand_budget(family, budget, model, groups, i)
                assert sample_budget_flops(budget, cfg, groups, units) == pytest.approx(target, rel=1e-12)
                m = matcher.match(groups, units, 1)
                table = [(k, count_flops(cfg, groups, schedule=method.schedule(groups, L, k)))
                         for k in method.knob_values(groups, L)]
                chosen = dict((repr(k), f) for k, f in table)[repr(m.knob)]
                assert m.flops == pytest.approx(chosen, rel=1e-12)
                cheapest = min(f for _, f in table)
                if cheapest > target * (1 + 1e-12):
                    assert not m.reachable and m.flops == pytest.approx(cheapest, rel=1e-12)
                    unreachable.append(f"{family}/{name}@{budget.name}/{hw[0]}x{hw[1]}")
                else:
                    assert m.reachable and m.flops <= target * (1 + 1e-12)
                    # within one knob step: nothing dearer still fits
                    assert not [k for k, f in table if m.flops * (1 + 1e-12) < f <= target * (1 + 1e-12)]
                measured = decoder_flops(model, inputs, method, m.knob)
                total = sum(x["total"] for x in measured)
                if name == "resize":  # k per image, an upper bound when the aspect ratio leaves fewer
                    assert total <= m.flops
                elif method.kind == "pre_llm" or name == "vtw":
                    assert total == m.flops, (name, budget, hw)
                else:  # in-LLM selectors re-project q/k through the layer's own modules to score tokens
                    rows = predicted_layers(model, groups, schedule=method.schedule(groups, L, m.knob))
                    for got, want in zip(measured, rows):
                        assert [got[c] for c in ("attn", "mlp", "v", "o")] == [want[c] for c in ("attn", "mlp", "v", "o")]
                        assert got["q"] >= want["q"] and got["k"] >= want["k"], (name, budget, hw)
                    overhead = max(overhead, total / m.flops - 1)
                checked += 1
    print(f"\n{family}: {checked} cells checked; selectors' scoring adds at most {overhead:.1%}; "
          f"unreachable: {unreachable}")
    # unreachable cells are only those the method's cheapest setting cannot reach (named above),
    # e.g. FastV/DART prune from layer K=2 of 4, so half of the prefill is always dense
    assert len(unreachable) < checked // 3


def _curves(pairs, L: int, seed: int) -> dict:
    """Strictly decreasing KL in the depth (pruning from a later layer costs less quality), 0 at L."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in pairs:
        steps = rng.uniform(0.01, 1.0, size=L)
        out[p] = [float(steps[d:].sum()) for d in range(L)] + [0.0]
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_dop_policy_resolved_per_sample_at_or_just_below_its_budget(family):
    model, samples = built(family)
    cfg, L = model.config, text_shape(model.config).num_layers
    adapter = get_adapter(model)
    pairs = all_pairs(["system", "vision", "instruction"])
    solver = ShapeSolver(cfg, pairs, _curves(pairs, L, seed=1), solver="exact")
    shares, unreachable = [], []
    for budget in BUDGETS[family]:
        for i, (inputs, hw) in enumerate(samples):
            groups = groups_of(model, inputs)
            target = hand_budget(family, budget, model, groups, i)
            assert sample_budget_flops(budget, cfg, groups, adapter.budget_units([hw])) == pytest.approx(target)
            try:
                sol = solver.solve(groups, target)
            except InfeasibleBudgetError:
                unreachable.append(f"{family}/dop@{budget.name}/{hw[0]}x{hw[1]}")
                continue
            policy = solver.policy(sol)
            flops = count_flops(cfg, groups, policy)
            assert flops == pytest.approx(sol.flops, rel=1e-9) and flops <= target * (1 + 1e-9)
            # within one depth step: deepening any parameter by one layer exceeds the budget
            for p in pairs:
                if sol.depths[p] < L:
                    deeper = DepthPolicy({**sol.depths, p: sol.depths[p] + 1}).expand(L)
                    assert count_flops(cfg, groups, deeper) > target * (1 + 1e-9), (p, budget, hw)
            measured = decoder_flops(model, inputs, policy=policy)
            assert sum(x["total"] for x in measured) == flops
            assert measured == predicted_layers(model, groups, policy=policy)
            shares.append(flops / count_flops(cfg, groups))
    assert not unreachable, unreachable
    assert len(shares) == 9
    print(f"\n{family}: DOP's share of dense per (budget, sample): {[round(x, 3) for x in shares]}")


def test_token_budget_units_per_image_and_per_crop():
    qwen, _ = built("qwen2_vl")
    nxt, samples = built("llava_next")
    assert get_adapter(qwen).budget_units([(56, 112), (112, 168)]) == 2  # k per image
    a = get_adapter(nxt)
    assert a.max_crops == 5 and a.reference_rows == 5 * 16
    assert [a.budget_units([hw]) for _, hw in samples] == [c / 5 for c in NEXT_CROPS]
    # equal FLOPs: the 5-crop sample's tokens:32 budget is 32 visual rows kept in every layer
    inputs, hw = samples[1]
    groups = groups_of(nxt, inputs)
    got = sample_budget_flops(Budget("tokens", 32), nxt.config, groups, a.budget_units([hw]))
    assert got == count_flops(nxt.config, {**groups, "vision": 32})


LLAVA15_TEXT = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064)
LLAVA15_PROMPT = {"system": 35, "vision": 576, "instruction": 45}


@pytest.mark.parametrize("k", [192, 128, 64])
def test_pdrop_schedule_at_llava15_budgets_is_geometric(k):
    pdrop = get_method("pdrop")
    m = match_budget(pdrop, LLAVA15_TEXT, LLAVA15_PROMPT, Budget("tokens", k))
    first, lam = m.knob
    stages = pdrop.stages(32, m.knob)
    sched = pdrop.schedule(LLAVA15_PROMPT, 32, m.knob)
    print(f"\npdrop at tokens {k}: knob {m.knob}, kept {[(layer, sched[layer]['vision']) for layer, _ in stages]}")
    # a member of the paper's family: lam, lam^2, lam^3 from three evenly spaced boundaries
    assert [r for _, r in stages] == pytest.approx([lam, lam ** 2, lam ** 3])
    assert stages[0][0] == first and stages[2][0] - stages[1][0] == pytest.approx(stages[1][0] - first, abs=1)
    assert m.flops <= flops_for_tokens(LLAVA15_TEXT, LLAVA15_PROMPT, k)
    # the paper's first layer (8 dense layers: 144 tokens already) cannot fit; harder lambdas only from layer 1
    assert first < 8 and (lam >= 0.5 or first == 1)


@pytest.mark.parametrize("k", [192, 128, 96, 64])
def test_sparsevlm_labelled_rows_cost_more_than_their_names_and_matched_rows_fit(k):
    sparse = get_method("sparsevlm")
    labelled = nominal_match(sparse, LLAVA15_TEXT, LLAVA15_PROMPT, Budget("tokens", k))
    matched = match_budget(sparse, LLAVA15_TEXT, LLAVA15_PROMPT, Budget("tokens", k))
    print(f"\nsparsevlm at {k}: labelled {labelled.knob} = {labelled.equivalent_tokens:.1f} tokens, "
          f"matched {matched.knob} = {matched.equivalent_tokens:.1f}")
    assert labelled.knob == k and labelled.mode == "nominal" and not labelled.reachable
    assert labelled.equivalent_tokens > k + 10  # recycled clusters and dense early layers
    assert matched.knob[0] in sparse.schedules and 0 < matched.knob[1] < 1
    assert matched.flops <= matched.budget_flops and k - 2 < matched.equivalent_tokens <= k


def test_dop_with_a_front_end_resolved_per_sample():
    """The searched n_v curve (KL per kept visual tokens per image) re-solved jointly with the depths on
    each sample's sizes: values at or above the sample's own rows mean no reduction; FLOPs at most the
    budget, and FlopCounterMode on the run through the reducer agrees."""
    model, samples = built("qwen2_vl")
    cfg, L = model.config, text_shape(model.config).num_layers
    pairs = all_pairs(["system", "vision", "instruction"])
    nv_curve = {2: 0.8, 4: 0.3, 12: 0.05, 16: 0.0}  # measured on 16-row calibration images
    solver = ShapeSolver(cfg, pairs, _curves(pairs, L, seed=2), solver="exact", nv_curve=nv_curve, nv_full=16,
                         reducer="fastervlm")
    assert solver._nv_curve({"vision": 8}, 1) == {2: 0.8, 4: 0.3, 8: 0.0}  # its own 8 rows: no reduction
    seen_nv = set()
    for budget in (Budget("ratio", 0.6), Budget("ratio", 0.4)):
        for inputs, _ in samples:
            groups = groups_of(model, inputs)
            target = budget.value * count_flops(cfg, groups)
            sol = solver.solve(groups, target)
            policy = solver.policy(sol)
            flops = count_flops(cfg, groups, policy, num_images=1)
            assert flops == pytest.approx(sol.flops, rel=1e-9) and flops <= target * (1 + 1e-9)
            assert sum(x["total"] for x in decoder_flops(model, inputs, policy=policy)) == flops
            seen_nv.add(policy.n_v)
    assert len(seen_nv) > 1  # the front end's choice differs between samples / budgets
