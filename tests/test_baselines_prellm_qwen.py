"""Pre-LLM reducers on Qwen2-VL / Qwen2.5-VL (``dop.engine.baselines.vision_access``).

On Qwen the prompt keeps every ``<|image_pad|>``; the reducer picks ``k`` merger-output tokens per
image and the engine drops the other visual rows before decoder layer 0 (original M-RoPE positions).
Checked here: k kept rows per image at layer 0, forward and generate, batching with left padding,
keep-all == stock logits, an independent hand-dropped reference, the recomputed vision attention
against the block's own output, budget matching, refusals, and golden snapshots of the kept indices
on the tiny Qwen2-VL (regenerate with ``DOP_REGEN_GOLDEN=1``).

Images are larger than ``tiny_models``' (16 and 24 tokens per image instead of 4 and 6) so that
selections have room to differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from baseline_fixtures import check_golden
from PIL import Image
from tiny_models import BUILDERS, _texts, tokenizer

from dop.adapters import get_adapter
from dop.budget import Budget
from dop.engine.baselines import MethodError, get_method
from dop.engine.baselines.budget import match_budget
from dop.engine.baselines.vision_access import (
    group_order,
    merged_tokens_per_image,
    received_attention,
    score_block_index,
)
from dop.flops import flops_for_tokens

GOLDEN = Path(__file__).parent / "golden"
SUPPORTED = ["fastervlm", "visionzip", "prumerge_plus", "divprune", "vispruner"]
KINDS = ["qwen2_vl", "qwen2_5_vl"]
SIZES = [(112, 112), (112, 168), (168, 112)]  # 8x8 and 8x12 patches -> 16 and 24 tokens per image


def _processor():
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class ImageOnly(Qwen2VLProcessor):  # no torchvision: drop the video slot (transformers-notes P1)
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    ip = Qwen2VLImageProcessorPil(min_pixels=28 ** 2, max_pixels=112 * 168, patch_size=14, temporal_patch_size=2,
                                  merge_size=2)
    return ImageOnly(image_processor=ip, tokenizer=tokenizer())


PROC = _processor()


def make_inputs(batch: int, seed: int):
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(rng.integers(0, 255, (*SIZES[i % 3], 3), dtype=np.uint8)) for i in range(batch)]
    texts = _texts(batch, seed, "<|im_start|> {sys} <|vision_start|> <|image_pad|> <|vision_end|> {q} "
                                "<|im_end|> <|im_start|> assistant")
    return dict(PROC(images=imgs, text=texts, return_tensors="pt", padding=True))


def one(inp, b):
    """Sample ``b`` of a batch alone, padding removed."""
    valid = inp["attention_mask"][b].bool()
    sizes = inp["image_grid_thw"].prod(-1).tolist()
    lo = sum(sizes[:b])
    return {"input_ids": inp["input_ids"][b:b + 1, valid], "attention_mask": inp["attention_mask"][b:b + 1, valid],
            "mm_token_type_ids": inp["mm_token_type_ids"][b:b + 1, valid],
            "pixel_values": inp["pixel_values"][lo:lo + sizes[b]], "image_grid_thw": inp["image_grid_thw"][b:b + 1]}


@pytest.fixture(scope="module", params=KINDS)
def qwen(request):
    model, _ = BUILDERS[request.param](attn="sdpa")
    return model


@pytest.fixture(scope="module")
def qwen2():
    return BUILDERS["qwen2_vl"](attn="sdpa")[0]


def visual_rows_at_layer0(method, model, x):
    vision = x["input_ids"] == model.config.image_token_id
    return (method.pruner.kept_masks[0]["q"] & vision).sum(1).tolist()


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SUPPORTED)
def test_forward_and_generate_keep_k_rows_per_image(qwen, name):
    model = qwen
    k = 5
    inp = make_inputs(2, 1)
    assert merged_tokens_per_image(model, inp["image_grid_thw"]) == [16, 24]
    m = get_method(name)
    with torch.no_grad(), m.apply(model, k):
        x = m.reduce_inputs(model, inp, k)
        assert x["input_ids"] is inp["input_ids"]  # the prompt is not shortened on Qwen
        last = model(**x).logits[:, -1].argmax(-1)
        assert visual_rows_at_layer0(m, model, x) == [k, k]
        assert all(kv == q for kv, q in zip(m.pruner.kept_rows[0]["kv"], m.pruner.kept_rows[0]["q"], strict=True))
        assert [len(s) for s in m.last_selection] == [k, k]
        gen = model.generate(**x, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, x["input_ids"].shape[1] + 3)
    assert gen[:, x["input_ids"].shape[1]].tolist() == last.tolist()
    visual = model.model.visual
    assert not visual._forward_hooks and not model.model._forward_pre_hooks
    assert not visual.blocks[score_block_index(model)].attn._forward_pre_hooks
    assert "forward" not in model.model.language_model.layers[0].__dict__


@pytest.mark.parametrize("name", SUPPORTED)
def test_batch_with_left_padding_equals_alone(qwen, name):
    model = qwen
    k = 4
    inp = make_inputs(3, 2)
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


def test_keep_all_is_the_stock_model(qwen):
    model = qwen
    inp = make_inputs(2, 0)
    with torch.no_grad():
        dense = model(**inp).logits
        for name in SUPPORTED:
            m = get_method(name)
            for k in (24, 99):  # 24 = tokens of the larger image: every image keeps all its tokens
                with m.apply(model, k):
                    assert torch.equal(model(**m.reduce_inputs(model, inp, k)).logits, dense)
                    assert [len(s) for s in m.last_selection] == [16, 24]


@pytest.mark.parametrize("k", [0, 1, 20])
def test_k_is_per_image_and_capped_by_its_tokens(qwen, k):
    model = qwen
    inp = make_inputs(2, 1)  # 16 and 24 tokens
    for name in SUPPORTED:
        m = get_method(name)
        with torch.no_grad(), m.apply(model, k):
            model(**m.reduce_inputs(model, inp, k))
            assert visual_rows_at_layer0(m, model, inp) == [min(k, 16), min(k, 24)]


@pytest.mark.parametrize("name", ["fastervlm", "visionzip", "prumerge_plus"])
def test_matches_a_hand_dropped_prompt_at_original_positions(qwen, name):
    """Independent reference: the stock model on the kept rows only (image features as the method left
    them), with the M-RoPE positions of the full prompt (``get_rope_index``)."""
    model = qwen
    k = 6
    inp = one(make_inputs(2, 3), 1)
    m = get_method(name)
    feats = []
    with torch.no_grad(), m.apply(model, k):
        h = model.model.visual.register_forward_hook(lambda mod, a, out: feats.append(out.pooler_output))
        try:
            out = model(**m.reduce_inputs(model, inp, k)).logits
        finally:
            h.remove()
    ids = inp["input_ids"]
    vision = ids == model.config.image_token_id
    sel = m.last_selection[0]
    keep = ~vision[0]
    keep[vision[0].nonzero().flatten()[sel]] = True
    with torch.no_grad():
        pos, _ = model.model.get_rope_index(ids, image_grid_thw=inp["image_grid_thw"],
                                            attention_mask=inp["attention_mask"],
                                            mm_token_type_ids=inp["mm_token_type_ids"])
        emb = model.get_input_embeddings()(ids)
        emb[vision] = feats[0]
        ref = model(inputs_embeds=emb[:, keep], position_ids=pos[:, :, keep],
                    attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long)).logits
    torch.testing.assert_close(out[:, keep], ref, rtol=1e-5, atol=1e-5)
    if name != "fastervlm":  # merging methods rewrite some kept rows
        dense = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output[0]
        assert not torch.allclose(feats[0][sel], dense[sel])


def test_score_is_the_blocks_own_attention(qwen):
    """The recomputed attention reproduces the score block's output; groups map to the merger rows."""
    model = qwen
    inp = make_inputs(2, 4)
    visual = model.model.visual
    attn = visual.blocks[score_block_index(model)].attn
    cap = {}
    h1 = attn.register_forward_pre_hook(lambda mod, a, kw: cap.update(x=a[0], pos=kw["position_embeddings"]),
                                        with_kwargs=True)
    h2 = attn.register_forward_hook(lambda mod, a, out: cap.update(out=out))
    try:
        with torch.no_grad():
            res = visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"])
    finally:
        h1.remove()
        h2.remove()
    x, (cos, sin), S = cap["x"], cap["pos"], cap["x"].shape[0]
    q, k, v = attn.qkv(x).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    rotary = __import__(type(attn).__module__, fromlist=["x"]).apply_rotary_pos_emb_vision
    q, k = rotary(q, k, cos, sin)
    lo, outs = 0, []
    for n in inp["image_grid_thw"].prod(-1).tolist():  # full attention within each image
        sl = slice(lo, lo + n)
        p = torch.softmax(q[sl].transpose(0, 1) @ k[sl].transpose(0, 1).transpose(-1, -2) * attn.scaling, -1)
        outs.append((p @ v[sl].transpose(0, 1)).transpose(0, 1).reshape(n, -1))
        got, _ = received_attention(attn, x[sl], cos[sl], sin[sl], chunk=5)
        torch.testing.assert_close(got, p.mean(dim=(0, 1)), rtol=1e-5, atol=1e-7)
        lo += n
    torch.testing.assert_close(attn.proj(torch.cat(outs)), cap["out"], rtol=1e-5, atol=1e-5)
    merged = visual.merger(res.last_hidden_state)  # tower row order
    torch.testing.assert_close(res.pooler_output[group_order(model, inp["image_grid_thw"])], merged)


@pytest.mark.parametrize("name", ["fastervlm", "visionzip"])
def test_the_score_block_projects_qkv_once(qwen, name):
    """The score is read from the block's own qkv projection, not projected a second time."""
    model = qwen
    qkv = model.model.visual.blocks[score_block_index(model)].attn.qkv
    calls = []
    handle = qkv.register_forward_hook(lambda mod, a, out: calls.append(a[0].shape[0]))
    m = get_method(name)
    inp = make_inputs(2, 1)
    try:
        with torch.no_grad(), m.apply(model, 3):
            model(**m.reduce_inputs(model, inp, 3))
    finally:
        handle.remove()
    assert calls == [int(inp["image_grid_thw"].prod(-1).sum())]  # one call: the tower's, over every patch


# --------------------------------------------------------------------------------------------
# Budget, refusals
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SUPPORTED)
def test_match_budget_on_qwen2_vl(qwen2, name):
    model = qwen2
    inp = one(make_inputs(2, 1), 0)
    masks = get_adapter(model).token_groups(inp["input_ids"], inp["attention_mask"])
    groups = {g: int(v[0].sum()) for g, v in masks.items()}
    assert groups["vision"] == 16
    m = get_method(name)
    match = match_budget(m, model.config, groups, Budget("tokens", 6))
    assert match.knob == 6 and match.flops == flops_for_tokens(model.config, groups, 6)
    with torch.no_grad(), m.apply(model, match.knob):
        model(**m.reduce_inputs(model, inp, match.knob))
        kept = m.pruner.kept_rows[0]["q"][0]
    assert kept == sum(m.schedule(groups, 4, match.knob)[0].values())


@pytest.mark.parametrize("name", ["trim", "cdpruner"])
def test_text_guided_reducers_are_refused_on_qwen(qwen2, name):
    m = get_method(name)
    with pytest.raises(MethodError, match=r"supports model types \['llava', 'llava_next'\].*'qwen2_vl'.*not a CLIP encoder"):
        m.check_model(qwen2)
    with pytest.raises(MethodError, match="not a CLIP encoder"):
        m.reduce_inputs(qwen2, make_inputs(1, 0), 4)


# --------------------------------------------------------------------------------------------
# Golden snapshots of kept indices on the tiny Qwen2-VL
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SUPPORTED)
def test_golden_kept_indices_qwen2_vl(qwen2, name):
    model = qwen2
    got = {}
    for k in (3, 8):
        m = get_method(name)
        inp = make_inputs(3, 5)
        with torch.no_grad(), m.apply(model, k):
            logits = model(**m.reduce_inputs(model, inp, k)).logits
        got[str(k)] = {"kept": [s.tolist() for s in m.last_selection],
                       "last_logit_sum": round(float(logits[:, -1].sum()), 3)}
    check_golden(GOLDEN / f"{name}_qwen2_vl.json", got)
