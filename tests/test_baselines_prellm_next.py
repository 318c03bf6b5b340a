"""Pre-LLM reducers on LLaVA-NeXT (``dop.engine.baselines.vision_access_next``).

As on Qwen-VL, the prompt keeps every ``<image>`` placeholder; the reducer picks ``k`` of each
image's packed rows (split over its crops, each crop scored by its own [CLS]) and the engine drops
the other visual rows before decoder layer 0 (original positions). Checked here: k rows per image at
layer 0 in forward and generate, per-crop quotas, batching with left padding and different crop
counts / unpadded shapes, keep-all == stock logits, an independent FasterVLM reference (eager
attentions, hand-written packing map, hand-built ``inputs_embeds``), budget matching against the
schedule, the n_v front end's selector, refusals, goldens (regenerate with ``DOP_REGEN_GOLDEN=1``).
TRIM and CDPruner on LLaVA-NeXT: ``test_baselines_prellm_next_text``.

The tiny LLaVA-NeXT here has 56-pixel crops (4x4 patches) so that unpadding removes rows:
(56, 80) -> base + 2 crops, 4x6 unpadded grid: 16 + 24 + 4 newlines = 44 rows;
(112, 112) -> base + 4 crops, 8x8: 16 + 64 + 8 = 88 rows; (90, 56) -> base + 2 crops, 6x4: 46 rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from baseline_fixtures import check_golden
from tiny_models import BUILDERS

from dop.adapters import get_adapter
from dop.budget import Budget
from dop.engine import prune
from dop.engine.baselines import MethodError, get_method
from dop.engine.baselines.budget import match_budget
from dop.engine.baselines.reducer import feature_layer_index, tower_layers
from dop.engine.baselines.vision_access_next import crop_quotas, packing_map
from dop.flops import flops_for_tokens

GOLDEN = Path(__file__).parent / "golden"
SUPPORTED = ["fastervlm", "visionzip", "prumerge_plus", "divprune", "vispruner"]
SIZES = [(56, 80), (112, 112), (90, 56)]
ROWS = [44, 88, 46]
PATCH_ROWS = [40, 80, 40]


@pytest.fixture(scope="module")
def built():
    return BUILDERS["llava_next"](attn="sdpa", crop=56)


@pytest.fixture(scope="module")
def next_model(built):
    return built[0]


def make_inputs(built, batch, seed, sizes=SIZES):
    return dict(built[1](batch, seed, sizes=sizes))


def one(inp, b):
    """Sample ``b`` of a batch alone, padding removed."""
    valid = inp["attention_mask"][b].bool()
    return {"input_ids": inp["input_ids"][b:b + 1, valid], "attention_mask": inp["attention_mask"][b:b + 1, valid],
            "pixel_values": inp["pixel_values"][b:b + 1], "image_sizes": inp["image_sizes"][b:b + 1]}


def visual_rows_at_layer0(method, model, x):
    vision = x["input_ids"] == model.config.image_token_id
    return (method.pruner.kept_masks[0]["q"] & vision).sum(1).tolist()


def test_prompt_rows_and_packing_map(built, next_model):
    inp = make_inputs(built, 3, 0)
    assert (inp["input_ids"] == next_model.config.image_token_id).sum(1).tolist() == ROWS
    maps = packing_map(next_model, [3, 5, 3], inp["image_sizes"], 16)
    assert [len(m.crop) for m in maps] == ROWS
    assert [int(m.is_patch.sum()) for m in maps] == PATCH_ROWS
    assert maps[0].crop[:16].tolist() == [0] * 16 and maps[0].patch[:16].tolist() == list(range(16))


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SUPPORTED)
def test_forward_and_generate_keep_k_rows_per_image(built, next_model, name):
    model = next_model
    k = 7
    inp = make_inputs(built, 2, 1)
    m = get_method(name)
    with torch.no_grad(), m.apply(model, k):
        x = m.reduce_inputs(model, inp, k)
        assert x["input_ids"] is inp["input_ids"]  # the prompt is not shortened
        last = model(**x).logits[:, -1].argmax(-1)
        assert visual_rows_at_layer0(m, model, x) == [k, k]
        assert all(kv == q for kv, q in zip(m.pruner.kept_rows[0]["kv"], m.pruner.kept_rows[0]["q"], strict=True))
        assert [len(s) for s in m.last_selection] == [k, k]
        gen = model.generate(**x, max_new_tokens=3, do_sample=False)
        assert visual_rows_at_layer0(m, model, x) == [k, k]  # generate's prefill too
    assert gen.shape == (2, x["input_ids"].shape[1] + 3)
    assert gen[:, x["input_ids"].shape[1]].tolist() == last.tolist()
    assert "pack_image_features" not in model.model.__dict__
    assert not model.model._forward_pre_hooks and not model.model.multi_modal_projector._forward_pre_hooks
    layer = tower_layers(model)[feature_layer_index(model)]
    assert not layer.self_attn._forward_pre_hooks
    assert "forward" not in model.model.language_model.layers[0].__dict__


@pytest.mark.parametrize("name", ["fastervlm", "vispruner", "visionzip", "prumerge_plus"])
def test_k_is_split_evenly_over_the_crops(built, next_model, name):
    """Crop-wise methods keep ``crop_quotas`` patch rows of each crop; newline rows are never kept
    while there are patch rows left."""
    model = next_model
    inp = make_inputs(built, 2, 2)
    maps = packing_map(model, [3, 5], inp["image_sizes"], 16)
    for k in (8, 13):
        m = get_method(name)
        with torch.no_grad(), m.apply(model, k):
            model(**m.reduce_inputs(model, inp, k))
        for sel, mp in zip(m.last_selection, maps, strict=True):
            crops = mp.crop[sel]
            assert bool((crops >= 0).all())
            counts = [int((crops == c).sum()) for c in range(int(mp.crop.max()) + 1)]
            assert counts == crop_quotas(k, [int((mp.crop == c).sum()) for c in range(len(counts))])


def test_crop_quotas():
    assert crop_quotas(8, [16, 12, 12]) == [3, 3, 2]
    assert crop_quotas(10, [2, 16, 16]) == [2, 4, 4]
    assert crop_quotas(99, [2, 3]) == [2, 3]
    assert crop_quotas(0, [4, 4]) == [0, 0]


@pytest.mark.parametrize("name", SUPPORTED)
def test_batch_with_left_padding_and_different_crops_equals_alone(built, next_model, name):
    model = next_model
    k = 9
    inp = make_inputs(built, 3, 3)  # 3, 5 and 3 crops; 44, 88 and 46 rows
    assert (inp["attention_mask"][:, 0] == 0).any()  # left padded
    m = get_method(name)
    with torch.no_grad(), m.apply(model, k):
        batched = model(**m.reduce_inputs(model, inp, k)).logits
        sel = [s.tolist() for s in m.last_selection]
        for b in range(3):
            single = model(**m.reduce_inputs(model, one(inp, b), k)).logits
            assert [s.tolist() for s in m.last_selection] == [sel[b]]
            n = single.shape[1]
            torch.testing.assert_close(batched[b, -n:], single[0], rtol=1e-4, atol=1e-4)


def test_keep_all_is_the_stock_model(built, next_model):
    model = next_model
    inp = make_inputs(built, 2, 0)  # 44 and 88 rows
    with torch.no_grad():
        dense = model(**inp).logits
        for name in SUPPORTED:
            m = get_method(name)
            for k in (88, 999):
                with m.apply(model, k):
                    assert torch.equal(model(**m.reduce_inputs(model, inp, k)).logits, dense)
                    assert [len(s) for s in m.last_selection] == [44, 88]


@pytest.mark.parametrize("k", [0, 1, 42, 60])
def test_k_is_per_image_and_capped_by_its_rows(built, next_model, k):
    """``min(k, rows)`` visual rows per image; past the patch rows, newline rows fill in order."""
    model = next_model
    inp = make_inputs(built, 2, 1)  # 44 (40 patch) and 88 (80 patch) rows
    maps = packing_map(model, [3, 5], inp["image_sizes"], 16)
    for name in SUPPORTED:
        m = get_method(name)
        with torch.no_grad(), m.apply(model, k):
            model(**m.reduce_inputs(model, inp, k))
            assert visual_rows_at_layer0(m, model, inp) == [min(k, 44), min(k, 88)]
        for sel, mp, patches in zip(m.last_selection, maps, (40, 80), strict=True):
            assert int(mp.is_patch[sel].sum()) == min(k, patches)
            newlines = (~mp.is_patch).nonzero().squeeze(-1)
            assert sel[~mp.is_patch[sel]].tolist() == newlines[:max(k - patches, 0)].tolist()


# --------------------------------------------------------------------------------------------
# Independent reference (FasterVLM)
# --------------------------------------------------------------------------------------------
def hand_packing(image_size, crop_side, pinpoints, per_side):
    """Per packed row (crop, patch) or (-1, -1), written out independently of transformers' packing:
    base crop raster, then the anyres grid (crops row-major, each per_side x per_side) unpadded as
    LLaVA-NeXT's ``unpad_image`` does, one newline after each grid row."""
    from transformers.image_processing_utils import select_best_resolution

    h0, w0 = (int(v) for v in image_size)
    bh, bw = select_best_resolution((h0, w0), pinpoints)
    gh, gw = bh // crop_side, bw // crop_side  # crops per column / row
    H, W = gh * per_side, gw * per_side  # patch grid
    rows, cols = range(H), range(W)
    if w0 / h0 > W / H:
        new_h = int(round(h0 * (W / w0), 7))
        pad = (H - new_h) // 2
        rows = range(pad, H - pad)
    else:
        new_w = int(round(w0 * (H / h0), 7))
        pad = (W - new_w) // 2
        cols = range(pad, W - pad)
    out = [(0, p) for p in range(per_side * per_side)]
    for r in rows:
        for c in cols:
            crop = 1 + (r // per_side) * gw + c // per_side
            out.append((crop, (r % per_side) * per_side + c % per_side))
        out.append((-1, -1))
    return out


def test_fastervlm_matches_an_independent_reference(built, next_model):
    model = next_model
    eager = BUILDERS["llava_next"](attn="eager", crop=56)[0]
    eager.load_state_dict(model.state_dict())
    k = 10
    inp = one(make_inputs(built, 3, 4), 2)  # (90, 56): unpadded rows
    m = get_method("fastervlm")
    with torch.no_grad(), m.apply(model, k):
        out = model(**m.reduce_inputs(model, inp, k)).logits
    cfg = model.config
    packing = hand_packing(inp["image_sizes"][0].tolist(), 56, cfg.image_grid_pinpoints, 4)
    assert len(packing) == int((inp["input_ids"] == cfg.image_token_id).sum()) == 46
    with torch.no_grad():
        pix = inp["pixel_values"][0]
        n_crops = 1 + max(c for c, _ in packing)
        tower = eager.model.vision_tower(pix[:n_crops], output_attentions=True)
        cls = tower.attentions[feature_layer_index(model)][:, :, 0, 1:].mean(1)  # (crops, 16)
    # per crop: an even split of k (remainder to the first crops), top [CLS] attention among its rows
    by_crop = {c: [i for i, (cc, _) in enumerate(packing) if cc == c] for c in range(n_crops)}
    share, extra = divmod(k, n_crops)
    want = []
    for c in range(n_crops):
        rows = by_crop[c]
        score = torch.stack([cls[c, packing[i][1]] for i in rows])
        top = score.argsort(descending=True)[:share + (c < extra)]
        want += [rows[int(t)] for t in top]
    assert m.last_selection[0].tolist() == sorted(want)
    # the stock model on the kept rows only, at their original positions
    ids = inp["input_ids"]
    vision = ids == cfg.image_token_id
    keep = ~vision[0]
    keep[vision[0].nonzero().flatten()[sorted(want)]] = True
    with torch.no_grad():
        feats = model.model.get_image_features(inp["pixel_values"], inp["image_sizes"]).pooler_output[0]
        emb = model.get_input_embeddings()(ids)
        emb[vision] = feats
        T = ids.shape[1]
        ref = model(inputs_embeds=emb[:, keep], position_ids=torch.arange(T)[keep][None],
                    attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long)).logits
    torch.testing.assert_close(out[:, keep], ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Budget, DOP's front end, refusals
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SUPPORTED)
def test_match_budget_on_llava_next(built, next_model, name):
    model = next_model
    inp = one(make_inputs(built, 2, 1), 0)
    masks = get_adapter(model).token_groups(inp["input_ids"], inp["attention_mask"])
    groups = {g: int(v[0].sum()) for g, v in masks.items()}
    assert groups["vision"] == 44
    m = get_method(name)
    match = match_budget(m, model.config, groups, Budget("tokens", 6))
    assert match.knob == 6 and match.flops == flops_for_tokens(model.config, groups, 6)
    with torch.no_grad(), m.apply(model, match.knob):
        model(**m.reduce_inputs(model, inp, match.knob))
        kept = m.pruner.kept_rows[0]["q"][0]
        vision_kept = visual_rows_at_layer0(m, model, inp)[0]
    schedule = m.schedule(groups, 4, match.knob)
    assert vision_kept == schedule[0]["vision"] == 6
    assert kept == sum(schedule[0].values())


def test_visual_selector_runs_under_the_callers_engine(built, next_model):
    """DOP's n_v front end path: the reducer's selector inside the caller's own ``prune``, equal to the
    reducer's ``apply``."""
    model = next_model
    inp = make_inputs(built, 2, 5)
    k = 6
    m = get_method("vispruner")
    with torch.no_grad():
        with m.apply(model, k):
            theirs = model(**m.reduce_inputs(model, inp, k)).logits
        with m.visual_selector(model, k) as selector, prune(model, selectors=[selector]) as pruner:
            ours = model(**m.reduce_inputs(model, inp, k)).logits
            assert (pruner.kept_masks[0]["q"] & (inp["input_ids"] == 4)).sum(1).tolist() == [k, k]
    assert torch.equal(ours, theirs)


def test_front_end_policy_on_llava_next(built, next_model):
    """DOP's n_v front end (``dop.engine.front_end``) on LLaVA-NeXT: the n_v policy equals the VisPruner
    baseline, and a policy's operations act on the n_v kept rows (one engine, not two)."""
    from dop.engine.front_end import reduce_inputs
    from dop.policy import DepthPolicy, Policy

    model = next_model
    inp = make_inputs(built, 2, 6)
    k = 5
    base = get_method("vispruner")
    with torch.no_grad():
        with base.apply(model, k):
            theirs = model(**base.reduce_inputs(model, inp, k)).logits
        with prune(model, Policy(n_v=k)) as pruner:
            ours = model(**reduce_inputs(model, inp, Policy(n_v=k))).logits
            assert (pruner.kept_masks[0]["q"] & (inp["input_ids"] == 4)).sum(1).tolist() == [k, k]
        policy = DepthPolicy({"kv/vision": 2}, n_v=k).expand(len(get_adapter(model).decoder_layers()))
        with prune(model, policy) as pruner:
            model(**reduce_inputs(model, inp, policy))
            vision = inp["input_ids"] == 4
            assert (pruner.kept_masks[1]["kv"] & vision).sum(1).tolist() == [k, k]
            assert (pruner.kept_masks[2]["kv"] & vision).sum(1).tolist() == [0, 0]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", ["trim", "cdpruner"])
def test_text_guided_reducers_run_on_llava_next_with_a_matching_text_tower(next_model, name):
    """TRIM / CDPruner are no longer refused on LLaVA-NeXT (``test_baselines_prellm_next_text``); they
    still need a text tower whose ``visual_projection`` fits this tower's width."""
    with pytest.raises(MethodError, match="visual_projection expects width 64, the vision tower gives 32"):
        get_method(name, text_tower="tiny_clip_text").check_model(next_model)


def test_tokens_per_image_depends_on_the_image(next_model):
    from dop.engine.baselines.reducer import tokens_per_image

    with pytest.raises(MethodError, match="LLaVA-NeXT tokens per image depend on the image size"):
        tokens_per_image(next_model)


# --------------------------------------------------------------------------------------------
# Golden snapshots of kept rows on the tiny LLaVA-NeXT
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SUPPORTED)
def test_golden_kept_rows_llava_next(built, next_model, name):
    model = next_model
    got = {}
    for k in (5, 16):
        m = get_method(name)
        inp = make_inputs(built, 3, 7)
        with torch.no_grad(), m.apply(model, k):
            logits = model(**m.reduce_inputs(model, inp, k)).logits
        got[str(k)] = {"kept": [s.tolist() for s in m.last_selection],
                       "last_logit_sum": round(float(logits[:, -1].sum()), 3)}
    check_golden(GOLDEN / f"{name}_llava_next.json", got)
