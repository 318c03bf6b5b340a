"""TRIM and CDPruner on LLaVA-NeXT (text-guided pre-LLM reducers, ``dop.engine.baselines.vision_access_next``).

A tiny random CLIP whose vision side matches the tiny LLaVA-NeXT tower (``clip_fixtures.NEXT_TOWER``:
width 32, 56-pixel crops, patch 14) is saved with ``save_pretrained`` and given as ``text_tower``.
The prompt keeps every placeholder; each image's ``k`` packed rows are picked per crop against its
sample's instruction and the other visual rows are dropped before layer 0. Checked here: exactly
``k`` visual rows per image at layer 0 in forward and in ``generate`` (without a forward first: the
image -> sample map is made in ``reduce_inputs``); the kept set depends on the instruction; a left
padded batch of images of different sizes equals per-sample runs; ``k`` >= rows is the stock model;
independent slow references for both methods (tower hidden states, CLIP modules, a hand-written
packing map, brute-force DPP log-determinants, hand-built ``inputs_embeds``); goldens (regenerate
with ``DOP_REGEN_GOLDEN=1``); refusals.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from baseline_fixtures import check_golden
from clip_fixtures import NEXT_TOWER, save_tiny_clip
from test_baselines_prellm_next import hand_packing, one
from tiny_models import BUILDERS

from dop.engine.baselines import MethodError, get_method
from dop.engine.baselines.vision_access_next import image_samples

GOLDEN = Path(__file__).parent / "golden"
METHODS = ["trim", "cdpruner"]
SIZES = [(56, 80), (112, 112), (90, 56)]  # 44, 88, 46 packed rows (40, 80, 40 patch rows)
Q0 = "what colour is the object right of the green triangle ?"
Q1 = "how many objects are there ?"


@pytest.fixture(scope="module")
def built():
    return BUILDERS["llava_next"](attn="sdpa", crop=56)


@pytest.fixture(scope="module")
def model(built):
    return built[0]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip_next") / "tiny_clip", **NEXT_TOWER)


@pytest.fixture(scope="module")
def clip(clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)


def make_inputs(built, batch, seed, questions):
    inp = dict(built[1](batch, seed, sizes=SIZES))
    inp["instruction"] = list(questions)
    return inp


def single(inp, b):
    return {**one(inp, b), "instruction": [inp["instruction"][b]]}


def rows_at_layer0(m, model, x):
    vision = x["input_ids"] == model.config.image_token_id
    return (m.pruner.kept_masks[0]["q"] & vision).sum(1).tolist()


def run(model, clip_dir, name, inp, k):
    m = get_method(name, text_tower=str(clip_dir))
    with torch.no_grad(), m.apply(model, k):
        x = m.reduce_inputs(model, inp, k)
        logits = model(**x).logits
        rows = rows_at_layer0(m, model, x)
    return m, logits, rows


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_forward_and_generate_keep_k_rows_per_image(built, model, clip_dir, name):
    k = 7
    inp = make_inputs(built, 2, 1, [Q0, Q1])  # 44 and 88 rows
    m = get_method(name, text_tower=str(clip_dir))
    with torch.no_grad(), m.apply(model, k):
        x = m.reduce_inputs(model, inp, k)
        assert x["input_ids"] is inp["input_ids"]  # the prompt is not shortened
        assert m._image_samples.tolist() == [0, 1]
        gen = model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)  # no forward first
        assert rows_at_layer0(m, model, x) == [k, k]
        gen_sel = [s.tolist() for s in m.last_selection]
        last = model(**x).logits[:, -1].argmax(-1)
        assert rows_at_layer0(m, model, x) == [k, k]
        assert all(kv == q for kv, q in zip(m.pruner.kept_rows[0]["kv"], m.pruner.kept_rows[0]["q"], strict=True))
    assert [s.tolist() for s in m.last_selection] == gen_sel and [len(s) for s in gen_sel] == [k, k]
    n = x["input_ids"].shape[1]
    assert gen.shape == (2, n + 3) and gen[:, n].tolist() == last.tolist()
    if name == "trim":  # k - 1 patch rows + the pooled token on the image's last (newline) row
        assert [s[-1] for s in gen_sel] == [43, 87]
    assert "pack_image_features" not in model.model.__dict__ and not model.model._forward_pre_hooks


@pytest.mark.parametrize("name", METHODS)
def test_selection_depends_on_the_instruction(built, model, clip_dir, name):
    k = 7
    kept = []
    for q in (Q0, Q1):
        m, _, rows = run(model, clip_dir, name, make_inputs(built, 2, 1, [q, q]), k)
        assert rows == [k, k]
        kept.append([s.tolist() for s in m.last_selection])
    assert kept[0][0] != kept[1][0] and kept[0][1] != kept[1][1], kept  # same images, other question


@pytest.mark.parametrize("name", METHODS)
def test_batch_with_left_padding_and_different_sizes_equals_per_sample(built, model, clip_dir, name):
    k = 9
    inp = make_inputs(built, 3, 3, [Q1, Q0, "red circle at top_left"])  # 3, 5, 3 crops; 44, 88, 46 rows
    assert (inp["attention_mask"][:, 0] == 0).any()  # left padded
    m, batched, rows = run(model, clip_dir, name, inp, k)
    assert rows == [k, k, k]
    sel = [s.tolist() for s in m.last_selection]
    for b in range(3):
        alone, logits, rows = run(model, clip_dir, name, single(inp, b), k)
        assert rows == [k] and [s.tolist() for s in alone.last_selection] == [sel[b]]
        n = logits.shape[1]
        torch.testing.assert_close(batched[b, -n:], logits[0], rtol=1e-4, atol=1e-4)


def test_keep_all_is_the_stock_model(built, model, clip_dir):
    inp = make_inputs(built, 2, 0, [Q0, Q1])  # 44 and 88 rows
    stock = {k: v for k, v in inp.items() if k != "instruction"}
    with torch.no_grad():
        dense = model(**stock).logits
    for name in METHODS:
        for k in (88, 999):
            m, logits, rows = run(model, clip_dir, name, inp, k)
            assert torch.equal(logits, dense)
            assert rows == [44, 88] and [len(s) for s in m.last_selection] == [44, 88]


def test_image_samples_follow_the_placeholders(built, model):
    inp = make_inputs(built, 3, 3, [Q0] * 3)
    assert image_samples(model, inp["input_ids"], inp["image_sizes"]).tolist() == [0, 1, 2]
    with pytest.raises(MethodError, match="do not add up"):
        image_samples(model, inp["input_ids"], inp["image_sizes"][[1, 0, 2]])


# --------------------------------------------------------------------------------------------
# Independent slow references (one image, unpadded (90, 56): 3 crops, 46 rows)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def ref_text(clip, tok, text):
    """(1, P) normalised CLIP text embedding: the whole (short) question, end token's state."""
    ids = tok(text)["input_ids"]
    h = clip.text_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    e = clip.text_projection(h)
    return (e / e.norm())[None]


@torch.no_grad()
def ref_image(model, clip, inp):
    """Hand packing (row -> (crop, patch)), the crops' feature-layer patch features (crops, 16, C),
    their normalised CLIP embeddings (crops, 16, P) and projected patches (crops, 16, D)."""
    cfg = model.config
    packing = hand_packing(inp["image_sizes"][0].tolist(), 56, cfg.image_grid_pinpoints, 4)
    n_crops = 1 + max(c for c, _ in packing)
    tower = model.model.vision_tower
    hs = tower(inp["pixel_values"][0][:n_crops], output_hidden_states=True).hidden_states
    feats = hs[cfg.vision_feature_layer][:, 1:]
    x = clip.visual_projection(getattr(tower, "vision_model", tower).post_layernorm(feats))
    return packing, feats, x / x.norm(dim=-1, keepdim=True), model.model.multi_modal_projector(feats)


def even_split(k, n):
    share, extra = divmod(k, n)
    return [share + (c < extra) for c in range(n)]


def brute_force_dpp(L, k):
    chosen: list[int] = []
    for _ in range(k):
        vals = {j: torch.linalg.det(L[chosen + [j]][:, chosen + [j]]).item() for j in range(len(L)) if j not in chosen}
        chosen.append(max(vals, key=vals.get))
    return chosen


@torch.no_grad()
def ref_logits(model, inp, rows, contents):
    """The stock model on the prompt's non-visual rows + the kept visual ``rows`` (packed indices)
    holding ``contents`` (the stock packed rows where None), at their original positions."""
    cfg = model.config
    ids = inp["input_ids"]
    vision = ids == cfg.image_token_id
    feats = model.model.get_image_features(inp["pixel_values"], inp["image_sizes"]).pooler_output[0].clone()
    for r, c in contents.items():
        feats[r] = c
    emb = model.get_input_embeddings()(ids)
    emb[vision] = feats
    keep = ~vision[0]
    keep[vision[0].nonzero().flatten()[rows]] = True
    T = ids.shape[1]
    return model(inputs_embeds=emb[:, keep], position_ids=torch.arange(T)[keep][None],
                 attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long)).logits, keep


@pytest.mark.parametrize("k", [10, 14])
def test_cdpruner_matches_an_independent_reference(built, model, clip, clip_dir, k):
    """Official LLaVA-NeXT CDPruner per crop (baselines.md 2.11): relevance = min-max over all the
    image's crops of the mean negated cosine; L = diag(r) cos(projected) diag(r) on the crop's
    candidate rows; greedy MAP by log-determinants; k split evenly over crops. (At k = 14 a min-max
    over each crop's own candidate rows would keep another set: the image-wide one is checked.)"""
    clip_model, tok = clip
    inp = single(make_inputs(built, 3, 4, [Q0, Q1, Q0]), 2)
    m, out, rows = run(model, clip_dir, "cdpruner", inp, k)
    assert rows == [k]
    packing, _, patch, projected = ref_image(model, clip_model, inp)
    rel = -(patch @ ref_text(clip_model, tok, Q0).T).mean(-1)  # (crops, 16)
    rel = (rel - rel.min()) / (rel.max() - rel.min())
    want = []
    for c, q in enumerate(even_split(k, len(rel))):
        cand = [i for i, (cc, _) in enumerate(packing) if cc == c]
        p = [packing[i][1] for i in cand]
        xn = projected[c, p] / projected[c, p].norm(dim=-1, keepdim=True)
        L = (rel[c, p][:, None] * (xn @ xn.T) * rel[c, p][None]).double()
        want += [cand[j] for j in brute_force_dpp(L, q)]
    assert m.last_selection[0].tolist() == sorted(want)
    ref, keep = ref_logits(model, inp, sorted(want), {})
    torch.testing.assert_close(out[:, keep], ref, rtol=1e-5, atol=1e-5)


def test_trim_matches_an_independent_reference(built, model, clip, clip_dir):
    """TRIM per crop: top rows by softmax of the negated cosine to the question, k - 1 split evenly
    over the crops; the image's last packed row holds the projected mean feature of its other patch
    rows."""
    clip_model, tok = clip
    k = 10
    inp = single(make_inputs(built, 3, 4, [Q0, Q1, Q1]), 2)
    m, out, rows = run(model, clip_dir, "trim", inp, k)
    assert rows == [k]
    packing, feats, patch, _ = ref_image(model, clip_model, inp)
    score = torch.softmax(-(patch @ ref_text(clip_model, tok, Q1)[0]).flatten(), 0).view(patch.shape[:2])
    want = []
    for c, q in enumerate(even_split(k - 1, len(score))):
        cand = [i for i, (cc, _) in enumerate(packing) if cc == c]
        s = torch.stack([score[c, packing[i][1]] for i in cand])
        want += [cand[int(j)] for j in s.argsort(descending=True)[:q]]
    rest = [i for i, (c, _) in enumerate(packing) if c >= 0 and i not in want]
    last = len(packing) - 1
    assert packing[last] == (-1, -1)
    assert m.last_selection[0].tolist() == sorted(want) + [last]
    with torch.no_grad():
        pooled = model.model.multi_modal_projector(torch.stack([feats[packing[i][0], packing[i][1]] for i in rest])
                                                   .mean(0))
    ref, keep = ref_logits(model, inp, sorted(want) + [last], {last: pooled})
    torch.testing.assert_close(out[:, keep], ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_refusals_on_llava_next(built, model, clip_dir, name):
    with pytest.raises(MethodError, match="needs a CLIP text tower"):
        get_method(name).check_model(model)
    # the tiny LLaVA-1.5 text tower has the wrong width for this tower
    with pytest.raises(MethodError, match="visual_projection expects width 64, the vision tower gives 32"):
        get_method(name, text_tower="tiny_clip_text").check_model(model)
    m = get_method(name, text_tower=str(clip_dir))
    inp = make_inputs(built, 2, 1, [Q0, Q1])
    with pytest.raises(MethodError, match="inputs\\['instruction'\\]"):
        m.reduce_inputs(model, {k: v for k, v in inp.items() if k != "instruction"}, 5)
    with pytest.raises(MethodError, match="1 instruction"):
        m.reduce_inputs(model, {**inp, "instruction": [Q0]}, 5)
    stock = {k: v for k, v in inp.items() if k != "instruction"}
    with torch.no_grad(), m.apply(model, 5), pytest.raises(MethodError, match="no instruction encoded"):
        model(**stock)  # reduce_inputs never ran


# --------------------------------------------------------------------------------------------
# Golden snapshots of kept rows on the tiny LLaVA-NeXT
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_golden_kept_rows_llava_next(built, model, clip_dir, name):
    got = {}
    for k in (5, 16):
        inp = make_inputs(built, 3, 7, [Q0, Q1, "describe the image"])
        m, logits, _ = run(model, clip_dir, name, inp, k)
        got[str(k)] = {"kept": [s.tolist() for s in m.last_selection],
                       "last_logit_sum": round(float(logits[:, -1].sum()), 3)}
    check_golden(GOLDEN / f"{name}_llava_next.json", got)
