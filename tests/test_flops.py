"""dop.flops: pinned paper numbers, closed forms, policy-derived rows, and FlopCounterMode agreement."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlamaModel, LlavaConfig, LlavaForConditionalGeneration

from dop.flops import (
    FlopsError,
    TextShape,
    count_flops,
    equivalent_tokens,
    flops_breakdown,
    flops_for_tokens,
    flops_report,
    format_flops,
    format_kept_tokens,
    kept_tokens_per_layer,
    layer_rows,
    progressive_schedule,
    register_cpu_sdpa_flops,
    text_shape,
)
from dop.ops import Operation
from dop.policy import DepthPolicy, Policy

# LLaVA-1.5-7B's text model (Vicuna-7B = LLaMA-7B shape), built by hand: no hub access.
LLAMA7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)
PROMPT = {"system": 35, "vision": 576, "instruction": 100}
D, M, L = 4096, 11008, 32


def tera(x: float, digits: int = 2) -> float:
    return round(x / 1e12, digits)


# --- pinned numbers (paper-notes.md section 4, baselines.md 2.1/2.2) ---------------------------
def test_dop_dense_and_uniform_budgets() -> None:
    assert tera(count_flops(LLAMA7B, PROMPT)) == 9.47
    got = [tera(count_flops(LLAMA7B, {**PROMPT, "vision": k})) for k in (192, 128, 64)]
    assert got == [4.29, 3.44, 2.60]
    assert format_flops(count_flops(LLAMA7B, PROMPT)) == "9.47 TFLOPs"


def test_dop_llava_next_visual_only() -> None:
    assert tera(count_flops(LLAMA7B, {"vision": 2880})) == 41.65


def test_fastv_convention() -> None:
    assert tera(count_flops(LLAMA7B, PROMPT, convention="fastv")) == 3.71
    got = []
    for keep in (192, 128, 64):  # FastV K=2: 576 visual tokens in layers 0-1, `keep` after
        schedule = progressive_schedule(LLAMA7B, PROMPT, {2: {"vision": keep}})
        got.append(tera(count_flops(LLAMA7B, PROMPT, convention="fastv", schedule=schedule)))
    assert got == [1.80, 1.49, 1.18]


def test_pdrop_convention() -> None:
    assert tera(count_flops(LLAMA7B, PROMPT, convention="pdrop"), 3) == 3.817
    schedule = progressive_schedule(LLAMA7B, PROMPT, {8: {"vision": 288}, 16: {"vision": 144}, 24: {"vision": 72}})
    assert tera(count_flops(LLAMA7B, PROMPT, convention="pdrop", schedule=schedule), 3) == 1.777
    assert kept_tokens_per_layer(LLAMA7B, PROMPT, schedule=schedule) == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert format_kept_tokens(kept_tokens_per_layer(LLAMA7B, PROMPT, schedule=schedule)) == \
        "576x8 288x8 144x8 72x8 (avg 270)"
    # The same schedule as explicit rows (visual rows only, as the convention counts them).
    rows = [(n, n, n) for n in kept_tokens_per_layer(LLAMA7B, PROMPT, schedule=schedule)]
    assert count_flops(LLAMA7B, rows=rows, convention="pdrop") == \
        count_flops(LLAMA7B, PROMPT, convention="pdrop", schedule=schedule)


# --- closed forms -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 711, 2880])
def test_dense_closed_forms(n: int) -> None:
    g = {"system": 5, "vision": n - 5} if n > 5 else {"vision": n}
    assert count_flops(LLAMA7B, g) == L * (8 * n * D**2 + 4 * n * n * D + 6 * n * D * M)
    assert count_flops(LLAMA7B, g, convention="fastv") == L * (4 * n * D**2 + 2 * n * n * D + 2 * n * D * M)
    nv = g["vision"]
    assert count_flops(LLAMA7B, g, convention="pdrop") == L * (4 * nv * D**2 + 2 * nv * nv * D + 3 * nv * D * M)


def test_gqa_shapes() -> None:
    # Qwen-like: head_dim * heads (= 8 * 24 = 192) differs from hidden (160); 2 KV heads.
    cfg = {"hidden_size": 160, "intermediate_size": 400, "num_hidden_layers": 3,
           "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 24}
    d, m, dq, dkv, n = 160, 400, 192, 48, 37
    per_layer = 2 * 2 * n * d * dkv + 2 * 2 * n * d * dq + 2 * 2 * n * n * dq + 6 * n * d * m
    assert count_flops(cfg, {"vision": n}) == 3 * per_layer
    shape = text_shape(cfg)
    assert (shape.d_q, shape.d_kv) == (dq, dkv)
    # Without head_dim the width is hidden / heads.
    assert text_shape({**cfg, "head_dim": None}).head_dim == 20


def test_hand_computed_tiny_case() -> None:
    # d=4, m=6, H=2, KV=1, head_dim=2 -> d_q=4, d_kv=2; groups a=2, b=3; b's kv pruned at layer 1.
    cfg = TextShape(hidden_size=4, intermediate_size=6, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2)
    policy = Policy([Operation(1, "b", "kv")])
    # layer 0 (n=5): K 80, V 80, Q 160, O 160, QK 200, AV 200, MLP 720 = 1600
    # layer 1 (n_q=5, n_kv=2, n_mlp=5): K 32, V 32, Q 160, O 160, QK 80, AV 80, MLP 720 = 1264
    br = flops_breakdown(cfg, {"a": 2, "b": 3}, policy)
    assert [lf.total for lf in br.layers] == [1600, 1264]
    assert br.layers[1].as_dict() == {"layer": 1, "n_q": 5, "n_kv": 2, "n_mlp": 5, "q": 160, "k": 32, "v": 32,
                                      "o": 160, "qk": 80, "av": 80, "mlp": 720, "total": 1264}
    assert count_flops(cfg, {"a": 2, "b": 3}, policy) == 2864
    assert br.by_component()["mlp"] == 1440


# --- policy-derived rows ------------------------------------------------------------------------
def test_layer_rows_from_policy() -> None:
    policy = Policy([Operation(1, "vision", "kv"), Operation(2, "vision", "mlp"), Operation(2, "system", "q")])
    rows = layer_rows(3, PROMPT, policy)
    assert rows == [
        {"n_q": 711, "n_kv": 711, "n_mlp": 711},
        {"n_q": 711, "n_kv": 135, "n_mlp": 711},
        {"n_q": 676, "n_kv": 711, "n_mlp": 135},
    ]


def test_kv_only_policy_changes_exactly_the_kv_terms() -> None:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2)
    g = {"system": 3, "vision": 10, "instruction": 4}
    dense = flops_breakdown(cfg, g).layers
    kv_only = Policy([Operation(layer, "vision", "kv") for layer in (2, 3)])  # no dead-op closure
    pruned = flops_breakdown(cfg, g, kv_only).layers
    for layer in range(4):
        a, b = dense[layer], pruned[layer]
        for comp in ("q", "o", "mlp"):
            assert getattr(a, comp) == getattr(b, comp)
        if layer < 2:
            assert a == b
        else:
            for comp in ("k", "v", "qk", "av"):  # 17 -> 7 key rows
                assert getattr(b, comp) * 17 == getattr(a, comp) * 7


def test_depth_policy_follows_dead_op_closure() -> None:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4)
    g = {"system": 3, "vision": 10, "instruction": 4}
    depth = DepthPolicy({("kv", "vision"): 2})
    expanded = depth.expand(4)
    # The expansion adds q/mlp of vision from layer 2 (vision is not an output group) ...
    assert expanded.is_pruned(2, "vision", "q") and expanded.is_pruned(3, "vision", "mlp")
    # ... so layers >= 2 cost exactly a dense layer over the 7 other tokens, whichever form is passed.
    dense_full, dense_rest = flops_breakdown(cfg, g).layers[0].total, flops_breakdown(
        cfg, {"system": 3, "instruction": 4}).layers[0].total
    for policy in (depth, expanded):
        totals = [lf.total for lf in flops_breakdown(cfg, g, policy).layers]
        assert totals == [dense_full, dense_full, dense_rest, dense_rest]
    assert kept_tokens_per_layer(cfg, g, depth) == [10, 10, 0, 0]
    # Without the closure, vision q/mlp still run at layers 2-3.
    plain = depth.expand(4, dead_ops=False)
    assert count_flops(cfg, g, plain) > count_flops(cfg, g, depth)


# --- equivalent tokens --------------------------------------------------------------------------
@pytest.mark.parametrize("convention", ["dop", "fastv", "pdrop"])
@pytest.mark.parametrize("k", [0, 64, 128.5, 192, 576, 1000])
def test_equivalent_tokens_round_trip(convention: str, k: float) -> None:
    f = flops_for_tokens(LLAMA7B, PROMPT, k, convention=convention)
    assert equivalent_tokens(LLAMA7B, PROMPT, f, convention=convention) == pytest.approx(k, abs=1e-6)


def test_equivalent_tokens_of_a_policy_gqa() -> None:
    cfg = {"hidden_size": 160, "intermediate_size": 400, "num_hidden_layers": 8,
           "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 24}
    f = count_flops(cfg, PROMPT, DepthPolicy({("attn", "vision"): 3, ("mlp", "vision"): 2}))
    k = equivalent_tokens(cfg, PROMPT, f)
    assert 0 < k < 576
    assert flops_for_tokens(cfg, PROMPT, k) == pytest.approx(f, rel=1e-12)
    with pytest.raises(FlopsError, match="below the cost"):
        equivalent_tokens(cfg, PROMPT, flops_for_tokens(cfg, PROMPT, 0) * 0.5)


def test_report_prints_three_conventions() -> None:
    schedule = progressive_schedule(LLAMA7B, PROMPT, {2: {"vision": 192}})
    report = flops_report(LLAMA7B, PROMPT, schedule=schedule)
    text = str(report)
    for name in ("dop", "fastv", "pdrop"):
        assert name in text
    assert round(report.values["fastv"] / 1e12, 2) == 1.80
    assert report.dense["dop"] == count_flops(LLAMA7B, PROMPT)
    assert "576x2 192x30" in text


# --- errors -------------------------------------------------------------------------------------
def test_errors_name_the_bad_field() -> None:
    with pytest.raises(FlopsError, match=r"unknown FLOPs convention 'flop'.*'dop', 'fastv', 'pdrop'"):
        count_flops(LLAMA7B, PROMPT, convention="flop")
    with pytest.raises(ValueError, match="'text'"):
        count_flops(LLAMA7B, PROMPT, Policy([Operation(3, "text", "kv")]))
    with pytest.raises(FlopsError, match=r"groups\['vision'\] is negative"):
        count_flops(LLAMA7B, {"vision": -1})
    with pytest.raises(FlopsError, match="lacks 'intermediate_size'"):
        count_flops({"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2}, {"vision": 3})
    with pytest.raises(FlopsError, match="no visual group"):
        count_flops(LLAMA7B, {"system": 3}, convention="pdrop")
    with pytest.raises(FlopsError, match="schedule has 3 layers"):
        count_flops(LLAMA7B, PROMPT, schedule=[PROMPT] * 3)
    with pytest.raises(FlopsError, match="not both"):
        count_flops(LLAMA7B, PROMPT, rows=[(1, 1, 1)] * 32)
    with pytest.raises(FlopsError, match="lacks 'vocab_size'"):
        count_flops({**LLAMA7B.to_dict(), "vocab_size": None}, PROMPT, lm_head="last")
    with pytest.raises(FlopsError, match="vision config"):
        count_flops(LLAMA7B, PROMPT, include_vision=True)


def test_config_forms_agree() -> None:
    full = LlavaConfig(text_config=LLAMA7B.to_dict(), vision_config={"model_type": "clip_vision_model"})
    want = count_flops(LLAMA7B, PROMPT)
    assert count_flops(full, PROMPT) == want
    assert count_flops(LLAMA7B.to_dict(), PROMPT) == want
    assert count_flops(text_shape(LLAMA7B), PROMPT) == want


# --- FlopCounterMode agreement -----------------------------------------------------------------
def _layer_counts(counts: dict, prefix: str, num_layers: int) -> list[int]:
    return [sum(counts[f"{prefix}.{i}"].values()) for i in range(num_layers)]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_counter_agrees_on_dense_llama(impl: str) -> None:
    register_cpu_sdpa_flops()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=24, vocab_size=50, attn_implementation=impl)
    model = LlamaModel(cfg).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 50, (1, 13)))
    measured = _layer_counts(counter.get_flop_counts(), "LlamaModel.layers", 3)
    assert measured == [lf.total for lf in flops_breakdown(cfg, {"vision": 9, "instruction": 4}).layers]


def test_counter_agrees_on_decode_steps() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, attn_implementation="eager")
    model = LlamaModel(cfg).eval()
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 50, (1, 11)), use_cache=True)
        cache = out.past_key_values
        with FlopCounterMode(display=False) as counter:
            for _ in range(3):
                cache = model(input_ids=torch.randint(0, 50, (1, 1)), cache=cache,
                              use_cache=True).past_key_values
    measured = sum(_layer_counts(counter.get_flop_counts(), "LlamaModel.layers", 2))
    assert measured == flops_breakdown(cfg, {"instruction": 11}, decode_tokens=3).decode


def _tiny_llava() -> tuple[LlavaForConditionalGeneration, LlavaConfig]:
    tc = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=60)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=16)
    cfg = LlavaConfig(text_config=tc, vision_config=vc, image_token_index=59)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval(), cfg


def test_counter_agrees_on_vision_and_head() -> None:
    model, cfg = _tiny_llava()
    ids = torch.tensor([[1, 2] + [59] * 16 + [3, 4, 5]])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    counts = counter.get_flop_counts()

    def total(key: str) -> int:
        return sum(counts[f"LlavaForConditionalGeneration.{key}"].values())

    br = flops_breakdown(cfg, {"system": 2, "vision": 16, "instruction": 3}, include_vision=True, lm_head="all")
    assert br.vision == total("model.vision_tower") + total("model.multi_modal_projector")
    assert br.lm_head == total("lm_head")
    assert br.total == sum(counts["Global"].values())
    last = flops_breakdown(cfg, {"system": 2, "vision": 16, "instruction": 3}, lm_head="last").lm_head
    assert last * 21 == br.lm_head


def test_register_cpu_sdpa_flops_is_idempotent() -> None:
    register_cpu_sdpa_flops()
    assert register_cpu_sdpa_flops() is False
