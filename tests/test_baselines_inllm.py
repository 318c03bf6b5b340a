"""In-LLM baselines (FastV, PyramidDrop, SparseVLM, DART, VTW): selection on crafted inputs, golden
snapshots on the tiny models (``DOP_REGEN_GOLDEN=1`` rewrites them), batch == per sample, schedule ==
what runs, generation, published FLOPs figures and hyper-parameter errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import BUILDERS
from transformers import LlamaConfig

from dop.adapters import get_adapter
from dop.divergence import CalibrationBatch
from dop.engine.baselines import MethodError, get_method
from dop.engine.baselines.dart import dart_select
from dop.engine.baselines.sparsevlm import rater_scores, text_raters
from dop.engine.baselines.vtw import shallowest_below
from dop.flops import count_flops, flops_for_tokens, kept_tokens_per_layer

GOLDEN = Path(__file__).parent / "golden"
LLAMA7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
PROMPT = {"system": 35, "vision": 576, "instruction": 100}
# knob per method on the 4-layer tiny models (16 visual tokens in tiny LLaVA, 4-6 in tiny Qwen2-VL)
KNOBS = {"fastv": 5, "pdrop": (1, 0.5), "sparsevlm": 128, "dart": 8, "vtw": 2}
# tiny Qwen2-VL has 4-6 visual tokens: DART's 4 visual pivots alone would keep them all
HPARAMS = {("dart", "qwen2_vl"): {"pivot_image_tokens": 1, "pivot_text_tokens": 1}}
KNOBS_BY_FAMILY = {("dart", "qwen2_vl"): 2}
FAMILIES = ("llava", "qwen2_vl")
_MODELS: dict = {}


def tiny(family: str, attn: str = "eager"):
    if (family, attn) not in _MODELS:
        _MODELS[family, attn] = BUILDERS[family](attn=attn)
    return _MODELS[family, attn]


def flops(method, knob, convention, groups=PROMPT):
    # count_flops with the groups: Method.flops in base.py forgets to pass them (reported to the lead)
    return count_flops(LLAMA7B, groups, schedule=method.schedule(groups, 32, knob), convention=convention) / 1e12


def case(name, family):
    return get_method(name, **HPARAMS.get((name, family), {})), KNOBS_BY_FAMILY.get((name, family), KNOBS[name])


def kept_vision(model, inputs, name, knob, method=None):
    """Per layer, per sample: kept visual positions, counted from the sample's first non-padding row."""
    method = method or get_method(name)
    with method.apply(model, knob) as pruner:
        model(**inputs)
    valid = inputs["attention_mask"].bool()
    vision = get_adapter(model).token_groups(inputs["input_ids"], inputs["attention_mask"])["vision"]
    start = (~valid).sum(1)
    return {layer: [((m["kv"][b] & vision[b]).nonzero()[:, 0] - start[b]).tolist() for b in range(len(start))]
            for layer, m in sorted(pruner.kept_masks.items())}


# --- crafted inputs ---------------------------------------------------------------------------
class FakeCtx:
    """A LayerContext stand-in: fixed groups, a crafted attention row, recorded drops."""

    def __init__(self, layer_idx, groups, probs=None, hidden=None, num_layers=4):
        self.layer_idx, self.groups, self.probs, self.hidden = layer_idx, groups, probs, hidden
        self.valid = groups["system"] | groups["vision"] | groups["instruction"]
        self.num_layers, self.drops, self.asked = num_layers, [], None

    def keep(self, t="kv"):
        return self.valid.clone()

    def attention_probs(self, query_index, layer=None, hidden=None):
        self.asked = query_index
        return self.probs

    def watch_attention(self, query_index=None, keys=False):  # the crafted row, as if the layer had run
        self.asked = query_index
        return SimpleNamespace(probs=self.probs, keys=None)

    def drop(self, rows, from_layer=None):
        self.drops.append((self.layer_idx if from_layer is None else from_layer, rows))


def groups_of(spans):  # one sample per spec: (padding, system, vision, instruction)
    T = max(sum(s) for s in spans)
    out = {g: torch.zeros(len(spans), T, dtype=torch.bool) for g in ("system", "vision", "instruction")}
    for b, (_pad, *sizes) in enumerate(spans):  # padding = T - the sizes
        pos = T - sum(sizes)
        for g, n in zip(("system", "vision", "instruction"), sizes):
            out[g][b, pos : pos + n] = True
            pos += n
    return out


def test_fastv_keeps_the_rows_the_last_token_attends_most():
    groups = groups_of([(0, 2, 6, 2), (1, 1, 6, 2)])  # T=10; sample 1 left-padded by 1
    probs = torch.zeros(2, 2, 1, 10)
    probs[0, :, 0, [3, 6]] = torch.tensor([[0.3, 0.2], [0.1, 0.2]])  # head-mean 0.2, 0.2 -> tie by position
    probs[0, :, 0, 0] = 0.9  # a system row: never a candidate
    probs[1, 0, 0, [2, 7, 5]] = torch.tensor([0.5, 0.4, 0.3])
    from dop.engine.baselines.fastv import _FastVSelector

    selector = _FastVSelector(K=2, keep=2)
    ctx = FakeCtx(1, groups, probs)
    selector.before_layer(ctx)  # layer K-1: watches its attention, drops nothing yet
    assert ctx.asked.tolist() == [[9], [9]] and ctx.drops == []  # the last row of each sample
    ctx = FakeCtx(2, groups)
    selector.before_layer(ctx)
    (start, dropped), = ctx.drops
    assert start == 2
    kept = groups["vision"] & ~dropped
    assert kept[0].nonzero()[:, 0].tolist() == [3, 6] and kept[1].nonzero()[:, 0].tolist() == [2, 7]
    ctx = FakeCtx(0, groups, probs)  # other layers: nothing
    _FastVSelector(K=2, keep=2).before_layer(ctx)
    assert ctx.drops == []


def test_pdrop_stage_keeps_ratio_of_original_vision_by_last_instruction_attention():
    from dop.engine.baselines.pyramiddrop import _PDropSelector

    groups = groups_of([(0, 1, 8, 3)])  # vision rows 1..8, instruction 9..11
    probs = torch.zeros(1, 2, 1, 12)
    probs[0, :, 0, 1:9] = torch.arange(8.0)  # later visual rows more attended
    selector = _PDropSelector([(1, 0.5), (2, 0.25)])
    selector.before_layer(FakeCtx(0, groups, probs))
    ctx = FakeCtx(1, groups, probs)
    selector.before_layer(ctx)
    (start, dropped), = ctx.drops
    assert start == 1 and ctx.asked.tolist() == [[11]]
    assert (groups["vision"] & ~dropped)[0].nonzero()[:, 0].tolist() == [5, 6, 7, 8]  # 8 * 0.5


def test_sparsevlm_raters_and_scores():
    groups = groups_of([(0, 1, 3, 3)])  # vision 1..3, text 4..6
    hidden = torch.zeros(1, 7, 4)
    hidden[0, 1:4] = torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0], [4.0, 0, 0, 0]])
    hidden[0, 4:7] = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])  # row 4 matches the image
    raters = text_raters(hidden, groups["vision"], groups["instruction"])
    assert raters[0].nonzero()[:, 0].tolist() == [4]
    probs = torch.zeros(1, 2, 2, 7)
    probs[0, :, 0, 2] = 1.0  # the rater (query 0) looks at row 2
    probs[0, :, 1, 3] = 1.0  # a padding query, ignored
    score = rater_scores(probs, torch.tensor([[1, 0]]))
    assert score[0].argmax().item() == 2 and score[0, 3].item() == 0


def test_density_peak_clusters_find_the_blobs():
    from dop.engine.baselines.sparsevlm import density_peak_clusters, recycled

    g = torch.Generator().manual_seed(0)
    centres_true = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(5, 2, generator=g) for c in centres_true])  # 3 blobs of 5
    centres, assign = density_peak_clusters(x, 3)
    assert sorted(int(c) // 5 for c in centres) == [0, 1, 2]  # one centre per blob
    blob_of_cluster = {k: int(c) // 5 for k, c in enumerate(centres)}
    assert [blob_of_cluster[int(k)] for k in assign.argmax(1)] == [i // 5 for i in range(15)]
    assert torch.equal(assign[centres].argmax(1), torch.arange(3))
    assert recycled(276) == (83, 9) and recycled(0) == (0, 0) and recycled(1) == (1, 1)


def test_replace_equals_editing_the_layer_input():
    """A selector's replace() at layer 2 = the stock model with layer 2's input edited by a pre-hook."""
    from dop.engine import prune

    model, make_inputs = tiny("llava", "sdpa")
    inputs = make_inputs(2, seed=1)
    T = inputs["input_ids"].shape[1]
    rows = torch.zeros(2, T, dtype=torch.bool)
    rows[0, T - 4], rows[1, T - 6] = True, True
    value = torch.randn(2, T, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(1))

    class Replace:
        def before_layer(self, ctx):
            if ctx.layer_idx == 2:
                ctx.replace(rows, value)

    with torch.no_grad(), prune(model, selectors=[Replace()]):
        ours = model(**inputs).logits
    layer = get_adapter(model).decoder_layers()[2]

    def edit(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        h = torch.where(rows.unsqueeze(-1), value.to(h.dtype), h)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = layer.register_forward_pre_hook(edit, with_kwargs=True)
    try:
        with torch.no_grad():
            ref = model(**inputs).logits
    finally:
        handle.remove()
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=0)

    class Bad:
        def before_layer(self, ctx):
            if ctx.layer_idx == 1:
                ctx.drop(rows)
                ctx.replace(rows, value)

    from dop.engine import EngineError

    with pytest.raises(EngineError, match="does not keep"), torch.no_grad(), prune(model, selectors=[Bad()]):
        model(**inputs)


def test_dart_keeps_one_of_each_duplicate_set():
    # vision rows 0..5 hold A, A, B, B, C, C; text row 6; pivots: row 0 (largest key) and row 6
    A, B, C, Tx = [1.0, 0, 0], [-1.0, 0.2, 0], [0, 0, 1.0], [0, 0, -1.0]
    states = torch.tensor([[A, A, B, B, C, C, Tx]])
    keys = torch.ones(1, 7, 2)
    keys[0, 0] = 5.0
    vision = torch.tensor([[True] * 6 + [False]])
    kept = dart_select(keys, states, vision, ~vision, budget=2, pivot_image=1, pivot_text=1)
    kept_rows = kept[0].nonzero()[:, 0].tolist()
    assert len(kept_rows) == 3 and {r // 2 for r in kept_rows} == {0, 1, 2}


def test_vtw_k_search_on_a_crafted_curve():
    curve = {1: 0.9, 2: 0.2, 3: 0.009, 4: 0.02, 5: 0.001}
    assert shallowest_below(curve, 0.01) == 3  # the shallowest, even if a deeper K is worse
    assert shallowest_below(curve, 0.0001) is None
    assert shallowest_below(curve, 1.0) == 1


def test_vtw_find_k_on_the_tiny_model():
    model, make_inputs = tiny("llava")
    inputs = dict(make_inputs(2, seed=4))
    mask = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    mask[:, -1] = True
    batches = [CalibrationBatch(inputs, mask, ["a", "b"])]
    vtw = get_method("vtw", kl_threshold=1e9)
    K, curve = vtw.find_k(model, batches)
    assert sorted(curve) == vtw.candidates(4) == [1, 2, 3] and K == 1 and all(v > 0 for v in curve.values())
    K, _ = get_method("vtw", kl_threshold=0.0).find_k(model, batches, candidates=[3])
    assert K == 4  # nothing below the threshold: no withdrawal


# --- tiny models ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(KNOBS))
def test_golden_selection(name, family):
    model, make_inputs = tiny(family)
    method, knob = case(name, family)
    got = kept_vision(model, make_inputs(2, seed=3), name, knob, method)
    doc = {"method": name, "family": family, "hparams": method.hparams, "knob": knob, "batch": 2, "seed": 3,
           "kept_vision": {str(k): v for k, v in got.items()}}
    path = GOLDEN / f"{name}_{family}.json"
    if os.environ.get("DOP_REGEN_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(KNOBS))
def test_batch_equals_per_sample_and_schedule(name, family):
    model, make_inputs = tiny(family)
    inputs = make_inputs(3, seed=5)
    method, knob = case(name, family)
    batched = kept_vision(model, inputs, name, knob, method)
    valid = inputs["attention_mask"].bool()
    adapter = get_adapter(model)
    groups = adapter.token_groups(inputs["input_ids"], inputs["attention_mask"])
    patches = None
    if "image_grid_thw" in inputs:
        patches = torch.cat([torch.zeros(1, dtype=torch.long), inputs["image_grid_thw"].prod(-1).cumsum(0)])
    for b in range(3):
        one = {k: v[b : b + 1, valid[b]] for k, v in inputs.items()
               if torch.is_tensor(v) and v.shape[:2] == valid.shape}  # per-token tensors
        if patches is None:
            one["pixel_values"] = inputs["pixel_values"][b : b + 1]
        else:
            one["pixel_values"] = inputs["pixel_values"][patches[b] : patches[b + 1]]
            one["image_grid_thw"] = inputs["image_grid_thw"][b : b + 1]
        single = kept_vision(model, one, name, knob, method)
        assert {layer: v[b] for layer, v in batched.items()} == {layer: v[0] for layer, v in single.items()}
        # the FLOPs schedule is what ran
        sizes = {g: int(m[b].sum()) for g, m in groups.items()}
        expected = kept_tokens_per_layer(4, sizes, schedule=method.schedule(sizes, 4, knob))
        assert [len(v[b]) for _, v in sorted(batched.items())] == expected


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_sdpa_selects_like_eager_and_generation_runs(name):
    model, make_inputs = tiny("llava", "sdpa")
    inputs = make_inputs(3, seed=6)
    assert kept_vision(model, inputs, name, KNOBS[name]) == kept_vision(tiny("llava")[0], inputs, name, KNOBS[name])
    method = get_method(name)
    with method.apply(model, KNOBS[name]):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert all("forward" not in layer.__dict__ for layer in get_adapter(model).decoder_layers())  # restored


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_every_knob_value_has_a_schedule(name):
    method = get_method(name)
    for groups, layers in ((PROMPT, 32), ({"system": 4, "vision": 16, "instruction": 6}, 4)):
        values = method.knob_values(groups, layers)
        assert values
        kept = [kept_tokens_per_layer(layers, groups, schedule=method.schedule(groups, layers, v)) for v in values]
        assert all(0 <= n <= groups["vision"] for k in kept for n in k)


# --- FLOPs -----------------------------------------------------------------------------------
def test_fastv_flops_fastv_convention():
    fastv = get_method("fastv")
    assert round(flops(fastv, 288, "fastv"), 2) == 2.27  # K=2, R=50%: 38.8% fewer multiply-adds than 3.71
    assert [round(flops(fastv, k, "fastv"), 2) for k in (192, 128, 64)] == [1.80, 1.49, 1.18]
    assert fastv.paper_convention == "fastv"


def test_pdrop_default_schedule_flops_and_reachability():
    pdrop = get_method("pdrop")
    assert pdrop.paper_convention == "pdrop"
    assert pdrop.stages(32, (8, 0.5)) == pdrop.stages(32, None) == [(8, 0.5), (16, 0.25), (24, 0.125)]
    assert round(flops(pdrop, (8, 0.5), "pdrop"), 3) == 1.777
    assert round(flops(pdrop, [8, 0.5], "pdrop"), 3) == 1.777  # a knob read back from JSON/YAML
    assert pdrop.stages(32, (2, 0.5)) == [(2, 0.5), (12, 0.25), (22, 0.125)]
    assert pdrop.stages(4, (1, 0.5)) == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert pdrop.stages(32, (1, 0.3)) == [(1, 0.3), (11, 0.09), (22, 0.027)]  # 1 + round(8 * 31/24), ...; lam^s
    # the family: the paper's lam at every first layer (latest first), harder lam only from layer 1
    values = pdrop.knob_values(PROMPT, 32)
    assert values[:3] == [(8, 1.0), (8, 0.99), (8, 0.98)] and values[-1] == (1, 0.01)
    assert (8, 0.5) in values and (7, 0.5) in values and (1, 0.05) in values
    assert not any(f > 1 and lam < 0.5 for f, lam in values)
    with pytest.raises(MethodError, match="geometric"):
        get_method("pdrop", ratio_list=[0.5, 0.3, 0.1])
    budget64 = flops_for_tokens(LLAMA7B, PROMPT, 64)
    paper_layers = get_method("pdrop", first_layers=[8])
    cheapest = min(flops(paper_layers, k, "dop") for k in paper_layers.knob_values(PROMPT, 32))
    assert cheapest * 1e12 > flops_for_tokens(LLAMA7B, PROMPT, 128) > budget64  # unreachable at 8/16/24
    assert min(flops(pdrop, k, "dop") for k in pdrop.knob_values(PROMPT, 32)) * 1e12 <= budget64


def test_sparsevlm_and_dart_and_vtw_schedules():
    sparse = get_method("sparsevlm")
    values = sparse.knob_values(PROMPT, 32)
    assert values[0] == (192, 1.0) and all((k, 1.0) in values for k in (192, 128, 96, 64))
    # scaled rows: every count times the scale, rounded
    assert sparse.stages(32, (128, 0.5)) == [(2, 152), (6, 55), (15, 18)] and sparse.stages(32, 128) == [
        (2, 303), (6, 110), (15, 36)]
    assert sparse.nominal_knob(128, PROMPT, 32) == 128 and sparse.nominal_knob(640, PROMPT, 32, 1, 2880) == 128
    kept = kept_tokens_per_layer(32, PROMPT, schedule=sparse.schedule(PROMPT, 32, 192))
    # outputs of layers 2, 6, 15 pruned; + recycled clusters: 276 dropped -> 83 candidates -> 9 tokens,
    # then 309 - 200 = 109 -> 33 -> 4, then 204 - 110 = 94 -> 29 -> 3
    assert kept == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    plain = get_method("sparsevlm", recycle=False)
    kept = kept_tokens_per_layer(32, PROMPT, schedule=plain.schedule(PROMPT, 32, 192))
    assert kept == [576] * 3 + [300] * 4 + [200] * 9 + [110] * 16
    dart = get_method("dart")
    assert kept_tokens_per_layer(32, PROMPT, schedule=dart.schedule(PROMPT, 32, 192))[1:3] == [576, 196]
    vtw = get_method("vtw")
    assert kept_tokens_per_layer(32, PROMPT, schedule=vtw.schedule(PROMPT, 32, 15)) == [576] * 15 + [0] * 17
    assert vtw.default_k(32) == 15 and vtw.default_k(4) == 2


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hparams,match", [
    ("fastv", {"K": 0}, "K must be an int"),
    ("fastv", {"R": 3}, "unknown hyper-parameter"),
    ("pdrop", {"ratio_list": [0.25, 0.5, 0.125]}, "non-increasing"),
    ("pdrop", {"layer_list": [8, 16]}, "equal length"),
    ("pdrop", {"layer_list": [16, 8, 24]}, "strictly increasing"),
    ("sparsevlm", {"version": "2.0"}, "only version 1.5"),
    ("sparsevlm", {"schedules": {192: [300, 200]}}, "one non-increasing count"),
    ("dart", {"pivot_image_tokens": 0, "pivot_text_tokens": 0}, "at least one pivot"),
    ("dart", {"pruned_layer": 0}, "pruned_layer"),
    ("vtw", {"kl_threshold": -1}, "kl_threshold"),
])
def test_bad_hyper_parameters(name, hparams, match):
    with pytest.raises(MethodError, match=match):
        get_method(name, **hparams)


def test_bad_knobs_and_depths():
    model, _ = tiny("llava")
    with pytest.raises(MethodError, match="below the model's 4 decoder layers"):
        get_method("fastv", K=4).selectors(model, 3)
    with pytest.raises(MethodError, match="kept visual tokens"):
        get_method("fastv").schedule(PROMPT, 32, -1)
    with pytest.raises(MethodError, match="no schedule for budget 100"):
        get_method("sparsevlm").schedule(PROMPT, 32, 100)
    with pytest.raises(MethodError, match="first stage layer must be an int in 1..8"):
        get_method("pdrop").schedule(PROMPT, 32, (9, 1.0))
    with pytest.raises(MethodError, match=r"knob \(K\)"):
        get_method("vtw").selectors(model, 5)
    with pytest.raises(MethodError, match="do not fit"):
        get_method("pdrop", layer_list=[30, 31, 32]).schedule(PROMPT, 32, None)


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_keys_are_projected_once_per_kept_row(name):
    """Scoring reuses the keys a layer computes: the decoder's k_proj sees exactly the kept kv rows of
    the FLOPs schedule (PyramidDrop, which scores a layer's rows before that layer drops them, adds
    the keys of the rows each stage drops), so no layer's keys are projected twice."""
    model, make_inputs = tiny("llava", "sdpa")
    inputs = make_inputs(1, seed=3)
    method, knob = case(name, "llava")
    rows = []
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[1]))
             for layer in get_adapter(model).decoder_layers()]
    try:
        with torch.no_grad(), method.apply(model, knob):
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    groups = {g: int(m.sum()) for g, m in
              get_adapter(model).token_groups(inputs["input_ids"], inputs["attention_mask"]).items()}
    schedule = method.schedule(groups, 4, knob)
    expected = sum(sum(layer.values()) for layer in schedule)
    if name == "pdrop":
        expected += sum(schedule[s - 1]["vision"] - schedule[s]["vision"] for s, _ in method.stages(4, knob))
    assert sum(rows) == expected
