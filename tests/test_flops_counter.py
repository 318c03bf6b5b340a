"""count_flops == FlopCounterMode on the decoder layers of a tiny random LLaVA run under prune()."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from dop.engine import prune
from dop.flops import flops_breakdown, register_cpu_sdpa_flops
from dop.ops import OP_TYPES, PROMPT_GROUPS, Operation
from dop.policy import DepthPolicy, Policy

NUM_LAYERS, IMAGE_ID = 4, 59
GROUPS = {"system": 3, "vision": 16, "instruction": 5}
LAYER_KEY = "LlavaForConditionalGeneration.model.language_model.layers.{}"


def _model(impl: str) -> LlavaForConditionalGeneration:
    tc = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=24, vocab_size=60)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=16)
    cfg = LlavaConfig(text_config=tc, vision_config=vc, image_token_index=IMAGE_ID)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation=impl).eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = [1, 2, 3] + [IMAGE_ID] * 16 + [4, 5, 6, 7, 8]
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}


def _policies() -> list[Policy]:
    rng = random.Random(0)
    ops = [Operation(layer, g, t) for layer in range(NUM_LAYERS) for g in PROMPT_GROUPS for t in OP_TYPES]
    out = [Policy(), DepthPolicy({("kv", "vision"): 1, ("mlp", "vision"): 2}).expand(NUM_LAYERS)]
    out += [Policy(rng.sample(ops, rng.randint(1, len(ops) // 2))) for _ in range(4)]
    return out


def _measure(model: LlavaForConditionalGeneration, policy: Policy, decode_steps: int = 0) -> tuple[list[int], int]:
    """Per-layer prefill counts and the decoder-layer total of `decode_steps` single-token steps."""
    inputs = _inputs()
    with torch.no_grad(), prune(model, policy):
        # The engine recognises decode steps by the cache object it saw at prefill, so pass one
        # in (as generate() does); a cache the model creates internally is not seen.
        cache = DynamicCache(config=model.config.get_text_config()) if decode_steps else None
        with FlopCounterMode(display=False) as counter:
            model(**inputs, cache=cache, use_cache=decode_steps > 0)
        counts = counter.get_flop_counts()
        prefill = [sum(counts[LAYER_KEY.format(i)].values()) for i in range(NUM_LAYERS)]
        decode = 0
        for step in range(decode_steps):
            with FlopCounterMode(display=False) as counter:
                model(input_ids=torch.tensor([[10 + step]]), cache=cache, use_cache=True)
            counts = counter.get_flop_counts()
            decode += sum(sum(counts[LAYER_KEY.format(i)].values()) for i in range(NUM_LAYERS))
    return prefill, decode


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_count_flops_matches_counter_under_prune(impl: str) -> None:
    register_cpu_sdpa_flops()  # CPU SDPA is otherwise invisible to FlopCounterMode
    model = _model(impl)
    cfg = model.config
    for policy in _policies():
        measured, _ = _measure(model, policy)
        predicted = [lf.total for lf in flops_breakdown(cfg, GROUPS, policy).layers]
        assert measured == predicted, f"{impl} {policy.to_dict()['pruned']}"


def test_decode_steps_match_counter_under_prune() -> None:
    model = _model("eager")
    policy = DepthPolicy({("kv", "vision"): 1, ("kv", "system"): 3}).expand(NUM_LAYERS)
    _, measured = _measure(model, policy, decode_steps=3)
    assert measured == flops_breakdown(model.config, GROUPS, policy, decode_tokens=3).decode
