"""Input resizing on Qwen2-VL / Qwen2.5-VL: the rebuilt image and patch layout, the rewritten prompt
against the processor run on a smaller image, batching with left padding, and DOP's n_v through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_baselines_prellm_qwen import PROC, make_inputs
from tiny_models import BUILDERS, _texts

from dop.engine import prune
from dop.engine.baselines import MethodError, get_method
from dop.engine.baselines.resize import patchify, target_grid, unpatchify
from dop.engine.front_end import reduce_inputs, reducer_of
from dop.policy import DepthPolicy, Policy

TEMPLATE = "<|im_start|> {sys} <|vision_start|> <|image_pad|> <|vision_end|> {q} <|im_end|> <|im_start|> assistant"


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request):
    return BUILDERS[request.param](attn="sdpa")[0]


def test_target_grid_keeps_aspect_and_bound():
    assert target_grid(8, 12, 24, 2) == (8, 12)  # already within
    assert target_grid(8, 12, 6, 2) == (4, 6)  # 6 tokens: half each side
    assert target_grid(8, 8, 5, 2) == (4, 4)  # 4 <= 5 tokens, square kept
    assert target_grid(8, 12, 1, 2) == (2, 2)
    for h, w, k in [(8, 12, 7), (12, 8, 10), (16, 16, 9), (8, 8, 1)]:
        nh, nw = target_grid(h, w, k, 2)
        assert nh * nw // 4 <= k and nh % 2 == 0 and nw % 2 == 0


def test_unpatchify_inverts_the_processors_layout():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 168, 3), dtype=np.uint8))
    enc = PROC.image_processor(images=[img], return_tensors="pt")
    t, gh, gw = enc["image_grid_thw"][0].tolist()
    image = unpatchify(enc["pixel_values"], gh, gw, 2, 3, 2, 14)
    assert image.shape == (3, 112, 168)
    assert torch.equal(patchify(image, 2, 2, 14), enc["pixel_values"])


def test_prompt_equals_the_processor_on_a_smaller_image(qwen):
    """Resizing to 6 tokens rewrites the prompt exactly as the processor does for a 56 x 84 image."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (112, 168, 3), dtype=np.uint8))
    text = _texts(1, 0, TEMPLATE)
    full = dict(PROC(images=[img], text=text, return_tensors="pt"))
    small = dict(PROC(images=[img.resize((84, 56), Image.BICUBIC)], text=text, return_tensors="pt"))
    out = get_method("resize").reduce_inputs(qwen, full, 6)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(out[key], small[key]), key
    # pixels: the normalised-tensor resize is close to the processor's 8-bit PIL resize
    diff = (out["pixel_values"] - small["pixel_values"]).abs()
    assert out["pixel_values"].shape == small["pixel_values"].shape and float(diff.mean()) < 0.1
    with torch.no_grad():
        logits = qwen(**out).logits
    assert logits.shape[1] == small["input_ids"].shape[1] and torch.isfinite(logits).all()


def test_batch_with_left_padding_equals_per_sample(qwen):
    inputs = make_inputs(3, seed=2)  # 16, 24, 24 tokens
    method = get_method("resize")
    batch = method.reduce_inputs(qwen, inputs, 6)
    assert bool((batch["attention_mask"][:, 0] == 0).any())  # still left-padded
    with torch.no_grad():
        together = qwen(**batch).logits[:, -1]
        sizes = inputs["image_grid_thw"].prod(-1).tolist()
        for b in range(3):
            valid = inputs["attention_mask"][b].bool()
            lo = sum(sizes[:b])
            one = {"input_ids": inputs["input_ids"][b:b + 1, valid], "attention_mask": inputs["attention_mask"][b:b + 1, valid],
                   "mm_token_type_ids": inputs["mm_token_type_ids"][b:b + 1, valid],
                   "pixel_values": inputs["pixel_values"][lo:lo + sizes[b]], "image_grid_thw": inputs["image_grid_thw"][b:b + 1]}
            alone = qwen(**method.reduce_inputs(qwen, one, 6)).logits[0, -1]
            torch.testing.assert_close(together[b], alone, atol=1e-4, rtol=1e-4)
    n = (batch["input_ids"] == qwen.config.image_token_id).sum(1).tolist()
    assert all(x <= 6 for x in n) and n == [4, 6, 6]


def test_keep_all_is_the_stock_prompt_and_refusals(qwen):
    inputs = make_inputs(2, seed=0)
    out = get_method("resize").reduce_inputs(qwen, inputs, 99)
    assert all(torch.equal(out[k], inputs[k]) for k in inputs)
    with pytest.raises(MethodError, match="supports model types"):
        get_method("resize").check_model(BUILDERS["llava"]()[0])


def test_nv_front_end_by_input_resizing(qwen):
    """DOP's n_v with reducer=resize: the policy runs on the resized prompt, generation works."""
    inputs = make_inputs(2, seed=3)
    policy = DepthPolicy({"kv/vision": 1}, n_v=6, reducer="resize").expand(4)
    with torch.no_grad(), prune(qwen, policy) as pruner:
        x = reduce_inputs(qwen, inputs, policy)
        qwen(**x)
        gen = qwen.generate(**x, max_new_tokens=2, do_sample=False)
    assert (x["input_ids"] == qwen.config.image_token_id).sum(1).tolist() == [4, 6]
    assert pruner.kept_rows[0]["kv"] == x["attention_mask"].sum(1).tolist()  # layer 0 dense, shorter prompt
    assert gen.shape[1] == x["input_ids"].shape[1] + 2
    assert reducer_of(Policy(n_v=6, reducer="resize")).name == "resize"
