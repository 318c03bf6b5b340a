"""Pre-LLM reducers on InternVL (dop.engine.baselines.vision_access_internvl), on a tiny random
InternVL (tests/tiny_models.py: 28 px tiles of 4x4 patches, pixel shuffle 0.5 -> 4 rows per tile).

References: the tower's own eager attention probabilities for the per-row [CLS] score (summed over
the patches pixel shuffle merges, computed by running the model's pixel shuffle on the score map),
and the language model run by hand on the stock input embeddings with the dropped rows removed and
the kept rows at their original positions.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import BUILDERS

from dop.engine.baselines import get_method
from dop.engine.baselines.reducer import drops_rows, tokens_per_image
from dop.engine.baselines.vision_access_internvl import is_internvl, tile_tokens


@pytest.fixture(scope="module")
def internvl():
    torch.manual_seed(0)
    return BUILDERS["internvl"](attn="eager", layers=3)


def _tower_parts(model, pixel_values):
    """(attention input of the feature layer, projector input, projector output) as the model makes them."""
    grabbed = {}
    layer = model.model.vision_tower.encoder.layer[-1]

    def grab(module, args, kwargs) -> None:
        grabbed.setdefault("x", kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    h1 = layer.attention.register_forward_pre_hook(grab, with_kwargs=True)
    h2 = model.model.multi_modal_projector.register_forward_hook(
        lambda m, a, o: grabbed.update(features=a[0], projected=o))
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixel_values)
    finally:
        h1.remove()
        h2.remove()
    return grabbed["x"], grabbed["features"], grabbed["projected"]


def test_internvl_is_a_row_dropping_family(internvl):
    model, _ = internvl
    assert is_internvl(model) and drops_rows(model)
    with pytest.raises(Exception, match="IMG_CONTEXT"):
        tokens_per_image(model)


def test_cls_score_per_row_is_the_towers_attention_summed_over_merged_patches(internvl):
    model, make = internvl
    x = dict(make(2, seed=3))
    attn_x, features, projected = _tower_parts(model, x["pixel_values"])
    rows = tile_tokens(model, attn_x, features, projected)
    with torch.no_grad():
        probs = model.model.vision_tower(pixel_values=x["pixel_values"], output_attentions=True).attentions[-1]
    patch = probs[:, :, 0, 1:].mean(1)  # (tiles, 16): [CLS] -> patch, head mean
    side = int(patch.shape[1] ** 0.5)
    merged = model.model.pixel_shuffle(patch.reshape(-1, side, side, 1).double(),
                                       scale_factor=float(model.config.downsample_ratio))
    expected = merged.reshape(patch.shape[0], -1, merged.shape[-1]).sum(-1)  # (tiles, 4)
    for t, img in enumerate(rows):
        torch.testing.assert_close(img.score.double(), expected[t], atol=1e-6, rtol=1e-5)
        assert torch.equal(img.tokens, projected[t])
    assert len(rows) == 2 and rows[0].tokens.shape[0] == 4


def _by_hand(model, x, kept_visual: torch.Tensor) -> torch.Tensor:
    """Last-position logits of the language model on the stock embeddings, visual rows outside
    ``kept_visual`` (indices among the sample's visual rows) removed, positions unchanged."""
    ids = x["input_ids"][0]
    vision = ids == model.config.image_token_id
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=x["pixel_values"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[vision] = feats.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        keep = ~vision
        keep[vision.nonzero().squeeze(-1)[kept_visual]] = True
        pos = torch.arange(ids.shape[0])[keep]
        hidden = model.model.language_model(inputs_embeds=embeds[keep][None], position_ids=pos[None]).last_hidden_state
        return model.lm_head(hidden[:, -1])


@pytest.mark.parametrize("k", [4, 2, 1])
def test_fastervlm_keeps_the_top_cls_rows_and_equals_the_hand_pruned_model(internvl, k):
    model, make = internvl
    x = dict(make(1, seed=5))
    x.pop("attention_mask")
    method = get_method("fastervlm")
    with torch.no_grad():
        stock = model(**x).logits[:, -1]
        with method.apply(model, k):
            ours = model(**method.reduce_inputs(model, x, k)).logits[:, -1]
            (selection,) = method.last_selection
    attn_x, features, projected = _tower_parts(model, x["pixel_values"])
    (img,) = tile_tokens(model, attn_x, features, projected)
    top = torch.topk(img.score, k).indices.sort().values
    assert selection.tolist() == top.tolist()
    torch.testing.assert_close(ours, _by_hand(model, x, top), atol=1e-5, rtol=1e-4)
    if k >= 4:  # every row kept: the stock model
        torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-4)


def test_vispruner_keeps_k_rows_per_image_in_a_batch(internvl):
    model, make = internvl
    x = dict(make(2, seed=7))
    method = get_method("vispruner")
    with torch.no_grad(), method.apply(model, 3):
        logits = model(**method.reduce_inputs(model, x, 3)).logits
        kept = [s.numel() for s in method.last_selection]
        vision = x["input_ids"] == model.config.image_token_id
        rows = (method.pruner.kept_masks[0]["q"] & vision).sum(1).tolist()
    assert kept == [3, 3] and rows == [3, 3] and torch.isfinite(logits).all()
