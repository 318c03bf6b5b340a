"""Pre-LLM reducers (FasterVLM, VisionZip, PruMerge+, TRIM, DivPrune, VisPruner, CDPruner).

Known-answer selections on hand-built inputs, the prompt-shortening plumbing against a hand-built
run, batching with left padding, generation, the text-tower guard, FLOPs and golden snapshots of the
kept indices on the tiny LLaVA (regenerate with ``DOP_REGEN_GOLDEN=1``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import BUILDERS, tokenizer

from dop.engine.baselines import MethodError, get_method
from dop.engine.baselines.cdpruner import dpp_greedy
from dop.engine.baselines.divprune import divprune_select
from dop.engine.baselines.fastervlm import fastervlm_select
from dop.engine.baselines.prumerge import prumerge_select, prumerge_tokens
from dop.engine.baselines.reducer import iqr_outliers, shorten_prompt, tower_layers
from dop.engine.baselines.trim import trim_tokens
from dop.engine.baselines.visionzip import split_budget, visionzip_tokens
from dop.engine.baselines.vispruner import vispruner_select

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
VISION_ONLY = ["fastervlm", "visionzip", "prumerge_plus", "divprune", "vispruner"]
TEXT_GUIDED = ["trim", "cdpruner"]
ALL = VISION_ONLY + TEXT_GUIDED
INSTR = ["<s> what is in the image ? </s>", "<s> describe the colour </s>", "<s> left or right ? </s>"]


@pytest.fixture(scope="module")
def llava():
    return BUILDERS["llava"](attn="sdpa")


@pytest.fixture(scope="module")
def clip_tower():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=56, patch_size=14)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    return {"text_tower": clip, "text_tokenizer": tokenizer()}


def method(name, clip_tower=None, **kw):
    return get_method(name, **(clip_tower if name in TEXT_GUIDED else {}), **kw)


def batch_inputs(make, batch, seed, name):
    inp = dict(make(batch=batch, seed=seed))
    if name in TEXT_GUIDED:
        inp["instruction"] = INSTR[:batch]
    return inp


# --------------------------------------------------------------------------------------------
# Known-answer selections
# --------------------------------------------------------------------------------------------
def test_fastervlm_crafted_cls_row():
    att = torch.full((1, 2, 8), 0.01)
    att[0, 0, 5], att[0, 1, 2], att[0, 0, 7], att[0, 1, 7] = 0.5, 0.4, 0.2, 0.2  # head means: 5, 2, 7 lead
    assert fastervlm_select(att, 3).tolist() == [[2, 5, 7]]
    assert fastervlm_select(att, 0).shape == (1, 0)


def test_vispruner_important_then_dedup():
    att = torch.tensor([[[0.9, 0.8, 0.1, 0.5, 0.4, 0.3]]])  # important (k=5, r=0.4): patches 0, 1
    A, B, C = torch.eye(3)
    feats = torch.stack([C, C, A, B, A, C]).unsqueeze(0)  # residual order by score: 3(B), 4(A), 5(C), 2(A)
    # evens 3(B), 5(C) vs odds 4(A), 2(A): B and C are orthogonal to A -> both score 0; tie drops the
    # first even (3). Kept diverse: 5, 4, 2.
    assert vispruner_select(att, feats, 5, 0.4).tolist() == [[0, 1, 2, 4, 5]]
    feats2 = torch.stack([C, C, B, A, A, C]).unsqueeze(0)  # residual 3(A), 4(A), 5(C), 2(B): drop dup 3
    assert vispruner_select(att, feats2, 5, 0.4).tolist() == [[0, 1, 2, 4, 5]]
    assert vispruner_select(att, feats2, 4, 1.0).tolist() == fastervlm_select(att, 4).tolist()


def test_divprune_keeps_one_per_duplicate_set():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 8, generator=g)
    groups = [0, 1, 1, 2, 3, 3, 3, 4, 0, 2]
    tokens = base[groups].unsqueeze(0) * torch.rand(1, 10, 1, generator=g).add(0.5)  # cosine ignores scale
    kept = divprune_select(tokens, 5)[0].tolist()
    assert sorted({groups[i] for i in kept}) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", ["fastervlm", "visionzip", "prumerge_plus", "vispruner"])
def test_the_tower_projects_keys_once(llava, name):
    """[CLS] attention and keys come from the tower's own k_proj (only the [CLS] query is projected again)."""
    model, make = llava
    m = method(name)
    calls = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda mod, a, out, i=i: calls.setdefault(i, []).append(a[0].shape[1])) for i, layer in
        enumerate(tower_layers(model))]
    try:
        with torch.no_grad(), m.apply(model, 4):
            model(**m.reduce_inputs(model, make(batch=2, seed=1), 4))
    finally:
        for h in hooks:
            h.remove()
    assert all(c == [17] for c in calls.values())  # each layer once, on [CLS] + 16 patches: the tower's own call


def test_batched_selections_equal_one_image_at_a_time():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 20, 8, generator=g)
    rel = torch.rand(3, 20, generator=g)
    assert torch.equal(divprune_select(tokens, 7), torch.cat([divprune_select(t[None], 7) for t in tokens]))
    xn = torch.nn.functional.normalize(tokens, dim=-1)
    kernels = rel[:, :, None] * (xn @ xn.transpose(1, 2)) * rel[:, None, :]
    assert torch.equal(dpp_greedy(kernels, 6), torch.stack([dpp_greedy(kk, 6) for kk in kernels]))


def test_dpp_never_picks_two_identical_tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    x = torch.cat([x, x[:3]])  # tokens 6, 7, 8 duplicate 0, 1, 2
    rel = torch.rand(9, generator=g) + 0.5
    rel[6:] = rel[:3]
    kernel = rel[:, None] * (x @ x.T) * rel[None]
    for k in range(1, 7):
        chosen = dpp_greedy(kernel, k).tolist()
        assert len(chosen) == k
        for a, b in [(0, 6), (1, 7), (2, 8)]:
            assert not (a in chosen and b in chosen)


def test_prumerge_iqr_outlier_and_merge():
    s = torch.full((16,), 0.05)
    s[9] = 0.9
    assert iqr_outliers(s).nonzero().flatten().tolist() == [9]
    idx = prumerge_select(s.unsqueeze(0), 5)[0].tolist()  # outlier + 3 evenly spaced of the rest
    assert 9 in idx and len(idx) == 4 and idx == sorted(idx)
    assert prumerge_select(s.unsqueeze(0), 1).shape == (1, 0)
    # merge: neighbours by key cosine, weighted by cls attention; extra = weighted sum of the rest
    feats = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 2).clone()
    keys = torch.tensor([[[1.0, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]]])
    att = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    out = prumerge_tokens(feats, keys, att, torch.tensor([[0, 2]]), neighbours=1)
    assert torch.allclose(out[0, :, 0], torch.tensor([0 + 0.2 * 1, 2 + 0.4 * 3, 0.2 * 1 + 0.4 * 3]))


def test_visionzip_dominant_includes_cls_and_contextual_merge():
    assert split_budget(192, 54 / 64) == (162, 30) and split_budget(128, 54 / 64) == (108, 20)
    assert split_budget(64, 54 / 64) == (54, 10)
    hidden = torch.arange(7.0).view(1, 7, 1).expand(1, 7, 2).clone()  # [CLS] + 6 patches
    att = torch.tensor([[[0.0, 0.5, 0.0, 0.1, 0.0, 0.4]]])  # patches 1 and 5 (hidden rows 2, 6)
    metric = torch.ones(1, 7, 3)
    tokens, kept = visionzip_tokens(hidden, att, metric, dominant=3, contextual=1)
    assert kept.tolist() == [[1, 5]]
    # dominant: CLS (0), rows 2, 6; contextual: target = first remaining row (1) + mean(rows 3, 4, 5)
    assert tokens[0, :, 0].tolist() == [0.0, 2.0, 6.0, 1.0 + 4.0]


def test_trim_pooled_token():
    feats = torch.arange(10.0).view(1, 5, 2)
    scores = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    tokens, idx = trim_tokens(feats, scores, 3)
    assert idx.tolist() == [[1, 3]]
    assert torch.equal(tokens[0, 2], feats[0, [0, 2, 4]].mean(0))


def test_shorten_prompt_keeps_padding_side():
    ids = torch.tensor([[0, 0, 5, 4, 4, 4, 4, 7], [5, 4, 4, 4, 4, 4, 4, 4]])
    with pytest.raises(MethodError, match="multiple"):
        shorten_prompt(ids, torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]), 4, 4, 2)
    ids = torch.tensor([[0, 0, 0, 5, 4, 4, 4, 4, 7], [5, 4, 4, 4, 4, 4, 4, 4, 4]])
    mask = (ids != 0).long()
    new, m = shorten_prompt(ids, mask, 4, 4, 2)
    assert new.tolist() == [[0, 5, 4, 4, 7], [5, 4, 4, 4, 4]]  # two images in row 1
    assert m.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    new, m = shorten_prompt(ids.flip(1) * 0 + torch.tensor([5, 4, 4, 4, 4, 7, 0, 0, 0]), None, 4, 4, 1)
    assert new.tolist() == [[5, 4, 7, 0, 0, 0]] * 2 and m.tolist() == [[1] * 6] * 2
    right = torch.tensor([[5, 4, 4, 4, 4, 7, 0], [5, 6, 4, 4, 4, 4, 7]])
    new, m = shorten_prompt(right, (right != 0).long(), 4, 4, 1)
    assert new.tolist() == [[5, 4, 7, 0], [5, 6, 4, 7]] and m.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def _shorten_one_by_one(ids, mask, image_token, per_image, k, right):
    """The per-token reference: keep non-image tokens and the first k of each run of per_image."""
    rows = []
    for b in range(ids.shape[0]):
        kept, run = [], 0
        for t in ids[b][mask[b].bool()].tolist():
            if t == image_token:
                if run % per_image < k:
                    kept.append(t)
                run += 1
            else:
                kept.append(t)
        rows.append(kept)
    L = max(len(r) for r in rows)
    pad = [[0] * (L - len(r)) for r in rows]
    new = [r + p if right else p + r for r, p in zip(rows, pad, strict=True)]
    m = [[1] * len(r) + [0] * len(p) if right else [0] * len(p) + [1] * len(r) for r, p in zip(rows, pad, strict=True)]
    return new, m


@pytest.mark.parametrize("right", [False, True])
def test_shorten_prompt_equals_the_per_token_rule(right):
    g = torch.Generator().manual_seed(int(right))
    for trial in range(20):
        B, per_image, k = 3, 4, trial % 5
        samples = []
        for _ in range(B):  # text, then 1-2 images, then text, random lengths
            images = int(torch.randint(1, 3, (1,), generator=g))
            text = torch.randint(5, 9, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
            tail = torch.randint(5, 9, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()
            samples.append(text + [4] * (per_image * images) + tail)
        T = max(len(x) for x in samples)
        ids = torch.tensor([x + [0] * (T - len(x)) if right else [0] * (T - len(x)) + x for x in samples])
        mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) if right else [0] * (T - len(x)) + [1] * len(x)
                             for x in samples])
        new, m = shorten_prompt(ids, mask, 4, per_image, k)
        ref_ids, ref_mask = _shorten_one_by_one(ids, mask, 4, per_image, k, right and bool((mask[:, -1] == 0).any()))
        assert new.tolist() == ref_ids and m.tolist() == ref_mask


# --------------------------------------------------------------------------------------------
# The model runs on the shorter prompt
# --------------------------------------------------------------------------------------------
def _manual_logits(model, inp, k, tokens):
    """Hand-shortened prompt (one sample) with ``tokens`` (n_img, k, D) scattered at the placeholders."""
    ids = inp["input_ids"][0][inp["attention_mask"][0].bool()]
    img_id = model.config.image_token_id
    keep, run = [], 0
    for t in ids.tolist():
        if t == img_id:
            if run % 16 < k:
                keep.append(t)
            run += 1
        else:
            keep.append(t)
    ids = torch.tensor([keep])
    emb = model.get_input_embeddings()(ids)
    emb[ids == img_id] = tokens.reshape(-1, tokens.shape[-1])
    return model(inputs_embeds=emb, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("name", ALL)
def test_logits_equal_hand_shortened_prompt(llava, clip_tower, name):
    model, make = llava
    k = 5
    m = method(name, clip_tower)
    seen = []
    orig = m.reduce
    m.reduce = lambda ctx, kk: seen.append(orig(ctx, kk)) or seen[-1]  # record what reached the LLM
    inp = batch_inputs(make, 1, 2, name)
    with torch.no_grad(), m.apply(model, k):
        out = model(**m.reduce_inputs(model, inp, k)).logits
    with torch.no_grad():
        ref = _manual_logits(model, inp, k, seen[0])
    assert seen[0].shape == (1, k, model.config.text_config.hidden_size)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    projector = model.model.multi_modal_projector
    assert not projector._forward_hooks and not projector._forward_pre_hooks  # removed on exit


# methods whose selection reads every projected token; the others project only what reaches the LLM
READS_PROJECTED = {"divprune", "cdpruner"}


@pytest.mark.parametrize("name", ALL)
def test_projector_runs_once_on_what_the_method_needs(llava, clip_tower, name):
    model, make = llava
    k, n_img = 5, 2
    m = method(name, clip_tower)
    rows = []
    handle = model.model.multi_modal_projector.register_forward_hook(lambda mod, a, out: rows.append(a[0].shape[1]))
    try:
        with torch.no_grad(), m.apply(model, k):
            model(**m.reduce_inputs(model, batch_inputs(make, n_img, 2, name), k))
    finally:
        handle.remove()
    # the model's own call gets no rows (its output is replaced); the method's one call: all 16 patches
    # when its selection reads them (then gathered), else its k kept or merged tokens
    assert sorted(rows) == [0, 16 if name in READS_PROJECTED else k]


def test_fastervlm_matches_eager_attention_and_stock_projection(llava):
    """Independent reference: the [CLS] row from an eager tower's attention map, stock projector."""
    model, make = llava
    eager, _ = BUILDERS["llava"](attn="eager")
    inp = make(batch=1, seed=4)
    k = 6
    with torch.no_grad():
        outs = eager.model.vision_tower(inp["pixel_values"], output_attentions=True, output_hidden_states=True)
        att = outs.attentions[model.config.vision_feature_layer][:, :, 0, 1:]
        idx = att.mean(1).argsort(dim=-1, descending=True)[:, :k].sort().values
        feats = model.model.get_image_features(
            pixel_values=inp["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output[0]
        ref = _manual_logits(model, inp, k, feats[idx[0]].unsqueeze(0))
        m = get_method("fastervlm")
        with m.apply(model, k):
            out = model(**m.reduce_inputs(model, inp, k)).logits
    assert m.last_selection.tolist() == idx.tolist()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_batch_with_left_padding_equals_per_sample(llava, clip_tower, name):
    model, make = llava
    k = 4
    m = method(name, clip_tower)
    inp = batch_inputs(make, 3, 1, name)
    assert (inp["attention_mask"][:, 0] == 0).any()  # left padded
    with torch.no_grad(), m.apply(model, k):
        x = m.reduce_inputs(model, inp, k)
        batched = model(**x).logits
        sel = m.last_selection.clone()
        for b in range(3):
            one = {"input_ids": inp["input_ids"][b:b + 1], "attention_mask": inp["attention_mask"][b:b + 1],
                   "pixel_values": inp["pixel_values"][b:b + 1]}
            valid = one["attention_mask"][0].bool()
            one = {"input_ids": one["input_ids"][:, valid], "attention_mask": one["attention_mask"][:, valid],
                   "pixel_values": one["pixel_values"]}
            if name in TEXT_GUIDED:
                one["instruction"] = [INSTR[b]]
            single = model(**m.reduce_inputs(model, one, k)).logits
            assert m.last_selection[0].tolist() == sel[b].tolist()
            n = single.shape[1]
            torch.testing.assert_close(batched[b, -n:], single[0], rtol=1e-4, atol=1e-4)
    assert x["input_ids"].shape[1] == inp["input_ids"].shape[1] - 3 * 0 - (16 - k)


@pytest.mark.parametrize("name", ["fastervlm", "visionzip", "cdpruner"])
def test_generate(llava, clip_tower, name):
    model, make = llava
    m = method(name, clip_tower)
    inp = batch_inputs(make, 2, 3, name)
    with torch.no_grad(), m.apply(model, 3):
        x = m.reduce_inputs(model, inp, 3)
        last = model(**x).logits[:, -1].argmax(-1)
        gen = model.generate(**x, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, x["input_ids"].shape[1] + 3)
    assert gen[:, x["input_ids"].shape[1]].tolist() == last.tolist()


def test_forgot_reduce_inputs_is_a_clear_error(llava):
    model, make = llava
    m = get_method("fastervlm")
    with m.apply(model, 4), pytest.raises(MethodError, match="reduce_inputs"):
        model(**make(batch=1, seed=0))
    assert not model.model._forward_pre_hooks


def test_keep_all_and_keep_none(llava):
    model, make = llava
    inp = make(batch=2, seed=0)
    with torch.no_grad():
        dense = model(**inp).logits
        m = get_method("divprune")
        with m.apply(model, 16):
            assert torch.equal(model(**m.reduce_inputs(model, inp, 99)).logits, dense)
        with m.apply(model, 0):
            x = m.reduce_inputs(model, inp, 0)
            assert model(**x).logits.shape[1] == inp["input_ids"].shape[1] - 16


# --------------------------------------------------------------------------------------------
# Guards, configs, FLOPs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEXT_GUIDED)
def test_text_guided_without_text_tower_fails_before_running(llava, name):
    model, make = llava
    m = get_method(name)
    calls = []
    h = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(MethodError, match="text tower.*LLaVA keeps only the CLIP vision tower.*text_tower="):
            m.check_model(model)
        with pytest.raises(MethodError, match="text tower"), m.apply(model, 4):
            model(**make(batch=1, seed=0))
        with pytest.raises(MethodError, match="text tower"):
            m.reduce_inputs(model, make(batch=1, seed=0), 4)
    finally:
        h.remove()
    assert not calls


def test_text_guided_needs_instruction(llava, clip_tower):
    model, make = llava
    with pytest.raises(MethodError, match="instruction"):
        method("trim", clip_tower).reduce_inputs(model, make(batch=1, seed=0), 4)


@pytest.mark.parametrize("kind", ["qwen3_vl", "internvl"])
def test_unsupported_family_is_a_clear_error(kind):
    model, _ = BUILDERS[kind](attn="sdpa")
    with pytest.raises(MethodError, match=r"supports model types \['llava', 'qwen2_vl', 'qwen2_5_vl', 'llava_next'\]"
                                          rf".*Qwen2\.5-VL.*LLaVA-NeXT.*{kind}"):
        get_method("fastervlm").check_model(model)


@pytest.mark.parametrize("name", ALL)
def test_configs_bind(name):
    cfg = yaml.safe_load((ROOT / "conf" / "method" / f"{name}.yaml").read_text())
    assert cfg["name"] == name
    m = get_method(name, **{k: v for k, v in cfg.items() if k != "name"})
    assert m.kind == "pre_llm" and m.knob == "keep"


@pytest.mark.parametrize("name", ALL)
def test_flops_dop_convention_llava15_7b(name):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    groups = {"system": 35, "vision": 576, "instruction": 100}
    m = get_method(name)
    got = [round(m.flops(cfg, groups, k) / 1e12, 2) for k in (192, 128, 64)]
    assert got == [4.29, 3.44, 2.60]
    sched = m.schedule(groups, 32, 128)
    assert len(sched) == 32 and all(s["vision"] == 128 and s["system"] == 35 for s in sched)


# --------------------------------------------------------------------------------------------
# Golden snapshots of kept indices on the tiny LLaVA
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_golden_kept_indices(llava, clip_tower, name):
    model, make = llava
    got = {}
    for k in (3, 8):
        m = method(name, clip_tower)
        inp = batch_inputs(make, 3, 5, name)
        with torch.no_grad(), m.apply(model, k):
            logits = model(**m.reduce_inputs(model, inp, k)).logits
        got[str(k)] = {"kept": m.last_selection.tolist(), "last_logit_sum": round(float(logits[:, -1].sum()), 3)}
    path = GOLDEN / f"{name}_llava.json"
    if os.environ.get("DOP_REGEN_GOLDEN") == "1" or not path.exists():
        if os.environ.get("DOP_REGEN_GOLDEN") != "1":
            pytest.fail(f"{path} missing: run with DOP_REGEN_GOLDEN=1")
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(path.read_text())
    for k, v in want.items():
        assert got[k]["kept"] == v["kept"]
        assert abs(got[k]["last_logit_sum"] - v["last_logit_sum"]) < 1e-2
