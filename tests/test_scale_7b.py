"""7B-shaped models on CPU with random weights, in bf16 (``slow``: DOP_RUN_SLOW=1, ~15 min per model on 2 cores).

A full LLaVA-1.5-7B-shaped ``LlavaForConditionalGeneration`` (CLIP-L/336 tower, 576 image tokens,
32 x 4096 Llama, 32 heads) and a full Qwen2.5-VL-7B-shaped model (32-block windowed vision tower,
28 x 3584 decoder, GQA 28 / 4 heads, M-RoPE), built from their configs in bf16 directly (no fp32
copy: ~14 GB and ~17 GB of weights in 24 GB of RAM, so one model per test, freed after it). Each runs
the stock model and then one pruned prefill plus 3 decode steps of a DOP depth policy and of FastV,
PyramidDrop and VisPruner at the FLOPs of 128 visual tokens (knobs from ``match_budget``), checking
that the logits are finite, the 4 generated tokens come back, and the prefill really shrank (KV
cache rows, prompt length) at the sizes the real checkpoints have. Prints wall time per phase and the
process's peak RSS (``resource.getrusage``); run one model per process for its own peak::

    DOP_RUN_SLOW=1 .venv/bin/python -m pytest -q -s tests/test_scale_7b.py -k llava
"""

from __future__ import annotations

import gc
import resource
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers as tf
from transformers import LogitsProcessor, LogitsProcessorList

from dop.adapters import get_adapter
from dop.budget import Budget
from dop.engine import prune
from dop.engine.baselines import get_method
from dop.engine.baselines.budget import match_budget
from dop.flops import count_flops
from dop.policy import DepthPolicy

pytestmark = pytest.mark.slow

N_SYSTEM, N_VISION, N_INSTRUCTION = 35, 576, 100  # the LLaVA-1.5 prompt shape of the paper's FLOPs
NEW_TOKENS = 4  # one pruned prefill + 3 decode steps (the 4th token is never fed back)
BASELINES = ("fastv", "pdrop", "vispruner")
# vision kv from layer 8, q from 4, mlp from 2: a DOP-shaped depth policy (dead ops added by expand)
DOP_DEPTHS = {("kv", "vision"): 8, ("q", "vision"): 4, ("mlp", "vision"): 2}


def llava15_7b() -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[int, str]]:
    """llava-hf/llava-1.5-7b-hf's config, random bf16 weights, a tokenizer-free prompt."""
    vision = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                 hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = tf.LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                          rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         projector_hidden_act="gelu")
    model = tf.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    text_ids = torch.randint(3, 32000, (1, N_SYSTEM + N_INSTRUCTION), generator=g)
    text_ids[0, 0] = 1  # <s>
    ids = torch.cat([text_ids[:, :N_SYSTEM], torch.full((1, N_VISION), 32000), text_ids[:, N_SYSTEM:]], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, 336, 336, generator=g).to(torch.bfloat16)}
    return model.eval(), inputs, {32000: "<image>"}


def qwen25vl_7b() -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[int, str]]:
    """Qwen/Qwen2.5-VL-7B-Instruct's config, random bf16 weights, a 672 x 672 image (48 x 48 patches,
    576 merged tokens) between <|vision_start|> and <|vision_end|>."""
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                max_window_layers=28, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, hidden_act="silu", tokens_per_second=2)
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    model = tf.Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa",
                                                                dtype=torch.bfloat16)
    image, start, end = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    g = torch.Generator().manual_seed(0)
    text_ids = torch.randint(0, 151643, (1, N_SYSTEM + N_INSTRUCTION), generator=g)
    ids = torch.cat([text_ids[:, :N_SYSTEM - 1], torch.tensor([[start]]), torch.full((1, N_VISION), image),
                     torch.tensor([[end]]), text_ids[:, N_SYSTEM:N_SYSTEM + N_INSTRUCTION - 1]], dim=1)
    grid = torch.tensor([[1, 48, 48]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": (ids == image).long(),
              "pixel_values": torch.randn(48 * 48, 3 * 2 * 14 * 14, generator=g).to(torch.bfloat16),
              "image_grid_thw": grid}
    specials = {image: "<|image_pad|>", cfg.video_token_id: "<|video_pad|>", start: "<|vision_start|>"}
    return model.eval(), inputs, specials


class StepClock(LogitsProcessor):
    """Timestamps each generation step (called once per forward, after its logits)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def generate(model: torch.nn.Module, inputs: dict, specials: dict[int, str]) -> tuple[torch.Tensor, list, Any, list]:
    """Greedy ``NEW_TOKENS`` tokens: (new tokens, per-step logits, generate's output, seconds per step)."""
    clock = StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             bad_words_ids=[[t] for t in specials], logits_processor=LogitsProcessorList([clock]))
    steps = [b - a for a, b in zip([start, *clock.times], clock.times)]
    return out.sequences[:, inputs["input_ids"].shape[1]:], list(out.logits), out, steps


def check_generation(name: str, new: torch.Tensor, logits: list, vocab: int) -> None:
    assert new.shape == (1, NEW_TOKENS), f"{name}: generated {tuple(new.shape)}"
    assert bool(((new >= 0) & (new < vocab)).all()), f"{name}: token ids outside the vocabulary"
    assert len(logits) == NEW_TOKENS
    for step, lg in enumerate(logits):
        assert lg.shape[-1] >= vocab and bool(torch.isfinite(lg.float()).all()), f"{name}: step {step} not finite"


def run_family(build: Callable) -> None:
    t0 = time.perf_counter()
    model, inputs, specials = build()
    build_s = time.perf_counter() - t0
    adapter = get_adapter(model)
    text = model.config.get_text_config(decoder=True)
    L, vocab = adapter.num_layers, text.vocab_size
    params = sum(p.numel() for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    groups = {k: int(v.sum()) for k, v in adapter.token_groups(inputs["input_ids"], inputs["attention_mask"]).items()}
    assert groups["vision"] == N_VISION, groups
    T = inputs["input_ids"].shape[1]
    dense = count_flops(text, groups, convention="dop")
    budget = Budget("tokens", 128)
    print(f"\n{type(model).__name__}: {params / 1e9:.2f} B parameters (bf16), {L} layers, d={text.hidden_size}, "
          f"heads {text.num_attention_heads}/{text.num_key_value_heads} KV, prompt {T} tokens {groups}; "
          f"built in {build_s:.0f} s, peak RSS {peak_rss_gb():.1f} GiB")
    rows = []

    def record(name: str, knob, flops: float, steps: list[float], prompt: int, before_s: float = 0.0) -> None:
        rows.append((name, knob, flops, steps, prompt, before_s, peak_rss_gb()))

    new, logits, _, steps = generate(model, inputs, specials)
    check_generation("stock", new, logits, vocab)
    record("stock", None, dense, steps, T)

    policy = DepthPolicy(DOP_DEPTHS).expand(L)
    with prune(model, policy) as pruner:
        new, logits, out, steps = generate(model, inputs, specials)
    check_generation("dop", new, logits, vocab)
    kv_depth = DOP_DEPTHS[("kv", "vision")]
    assert pruner.kept_rows[kv_depth - 1]["kv"] == [T] and pruner.kept_rows[kv_depth]["kv"] == [T - N_VISION]
    cache = out.cache.layers  # pruned prefill rows + the 3 decoded rows
    assert [c.keys.shape[2] for c in cache] == [T + 3] * kv_depth + [T - N_VISION + 3] * (L - kv_depth)
    assert cache[0].keys.shape[1] == text.num_key_value_heads  # GQA widths as the real model has them
    label = "vision " + " ".join(f"{t}>={d}" for (t, _), d in DOP_DEPTHS.items())
    record("dop", label, count_flops(text, groups, policy=policy, convention="dop"), steps, T)

    for name in BASELINES:
        method = get_method(name)
        method.check_model(model)
        match = match_budget(method, model.config, groups, budget)
        start = time.perf_counter()  # a pre-LLM method's selection is part of its prefill
        with torch.inference_mode():
            prepared = dict(method.reduce_inputs(model, inputs, match.knob))
        before_s = time.perf_counter() - start
        with method.apply(model, match.knob):
            new, logits, out, steps = generate(model, prepared, specials)
        check_generation(name, new, logits, vocab)
        T_in = prepared["input_ids"].shape[1]
        last = out.cache.layers[-1].keys.shape[2] - 3
        if method.kind == "pre_llm":  # LLaVA shortens the prompt; Qwen drops the rows before layer 0
            assert min(T_in, last) == T - N_VISION + match.knob, (T_in, last, match.knob)
        else:
            assert T_in == T and last < T
        record(name, match.knob, match.flops, steps, T_in, before_s)

    print("| run | knob | TFLOPs | prefill (s) | of which before the LLM call (s) | 3 decode steps (s) | prompt | "
          "peak RSS (GiB) |\n|---|---|---|---|---|---|---|---|")
    for name, knob, flops, steps, prompt, before_s, rss in rows:
        print(f"| {name} | {knob if knob is not None else '-'} | {flops / 1e12:.2f} | {before_s + steps[0]:.1f} | "
              f"{before_s:.1f} | {sum(steps[1:]):.1f} | {prompt} | {rss:.1f} |")
    print(f"total {time.perf_counter() - t0:.0f} s")
    del model, out
    gc.collect()


@pytest.mark.parametrize("build", [llava15_7b, qwen25vl_7b], ids=["llava15_7b", "qwen25vl_7b"])
def test_7b_shaped_prefill_and_decode(build):
    torch.manual_seed(0)
    run_family(build)
