"""Each method's share of dense prefill FLOPs per sample, at the main table's budgets, on 3 image sizes.

No weights and no downloads: the 7B models are built on the meta device from their published shapes
(``scripts/estimate_cost.py``), their visual rows per image come from transformers' own processors
(LLaVA-NeXT's anyres count, Qwen2.5-VL's ``smart_resize``), and every sample is resolved as the
evaluate stage resolves it (``SampleMatcher``: the knob with the most FLOPs at or below the sample's own
budget; ``match=nominal``: the published knob for the token count). DOP is re-solved per sample by
``ShapeSolver`` on synthetic decreasing KL curves (its FLOPs do not depend on the real curves' values
beyond which depths they pick; the shares show how close a one-depth-step grid gets to the budget).

    .venv/bin/python scripts/equal_flops_table.py            # markdown tables on stdout

Prints (1) per (model, budget) the mean share of dense of each method over the 3 sizes (and, for
token budgets, the published-knob rows), (2) PyramidDrop's schedule at LLaVA-1.5's 192/128/64, and
(3) SparseVLM's labelled and FLOPs-matched rows.
"""

from __future__ import annotations

import statistics
import sys

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from dop.adapters import get_adapter
from dop.budget import Budget
from dop.engine.baselines import METHODS, MethodError, get_method
from dop.engine.baselines.budget import SampleMatcher, match_budget, nominal_match, sample_budget_flops
from dop.flops import count_flops, text_shape
from dop.search.per_shape import ShapeSolver
from dop.space import all_pairs

SIZES = [(240, 320), (375, 500), (768, 1024)]  # (height, width): small, GQA-like, large
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064)
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064)
CLIP_L336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14, projection_dim=768)
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
INSTRUCTION = 45  # a GQA question's tokens (scripts/estimate_cost.py)
BUDGETS = {"llava15_7b": [Budget("tokens", v) for v in (192, 128, 64)],
           "llava_next_7b": [Budget("tokens", v) for v in (640, 320, 160)],
           "qwen25vl_7b": [Budget("ratio", v) for v in (0.453, 0.363, 0.275)]}
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 3136, 12845056  # Qwen2.5-VL-7B-Instruct's preprocessor_config.json


def _meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def _next_rows() -> LlavaNextProcessor:
    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "q"]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=["<image>"])
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=PINPOINTS)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, image_token="<image>")


def samples(name: str):
    """(model on meta, [(groups, (h, w))] for the 3 sizes)."""
    if name == "llava15_7b":
        cfg = LlavaConfig(vision_config=CLIP_L336, text_config=LlamaConfig(**VICUNA_7B), image_token_index=32000)
        return _meta(LlavaForConditionalGeneration, cfg), [({"system": 35, "vision": 576, "instruction": INSTRUCTION}, hw)
                                                           for hw in SIZES]
    if name == "llava_next_7b":
        cfg = LlavaNextConfig(vision_config=CLIP_L336, text_config=LlamaConfig(**VICUNA_7B), image_token_index=32000,
                              image_grid_pinpoints=PINPOINTS)
        proc = _next_rows()
        out = []
        for h, w in SIZES:
            ids = proc(images=[Image.new("RGB", (w, h))], text="<image> q", return_tensors="pt")["input_ids"]
            out.append(({"system": 35, "vision": int((ids == 4).sum()), "instruction": INSTRUCTION}, (h, w)))
        return _meta(LlavaNextForConditionalGeneration, cfg), out
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415 - one model

    text = {**QWEN2_7B, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config={"depth": 2, "out_hidden_size": 3584})
    out = []
    for h, w in SIZES:
        rh, rw = smart_resize(h, w, 28, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
        out.append(({"system": 20, "vision": rh * rw // 28 ** 2, "instruction": INSTRUCTION}, (h, w)))
    return _meta(Qwen2_5_VLForConditionalGeneration, cfg), out


def methods_for(model) -> list[str]:
    mtype = model.config.model_type
    names = []
    for name in sorted(METHODS):
        if name == "resize" and mtype not in ("qwen2_vl", "qwen2_5_vl"):
            continue
        if name in ("trim", "cdpruner") and mtype not in ("llava", "llava_next"):
            continue  # they need a CLIP text tower in the vision tower's joint space
        names.append(name)
    return names


def _curves(pairs, L: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for p in pairs:
        steps = rng.uniform(0.01, 1.0, size=L)
        out[p] = [float(steps[d:].sum()) for d in range(L)] + [0.0]
    return out


def shares_table() -> str:
    header = None
    lines = []
    for name in BUDGETS:
        model, rows = samples(name)
        cfg, adapter = model.config, get_adapter(model)
        L = text_shape(cfg).num_layers
        pairs = all_pairs(["system", "vision", "instruction"])
        dop = ShapeSolver(cfg, pairs, _curves(pairs, L))
        names = methods_for(model)
        if header is None:
            header = ["model", "budget", "visual rows", "budget share", "dop", *sorted(METHODS)]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for budget in BUDGETS[name]:
            for mode in ("flops", "nominal") if budget.kind == "tokens" else ("flops",):
                cells: dict[str, str] = {}
                targets, dops = [], []
                for groups, hw in rows:
                    dense = count_flops(cfg, groups)
                    units = adapter.budget_units([hw])
                    target = sample_budget_flops(budget, cfg, groups, units)
                    targets.append(target / dense)
                    dops.append(dop.solve(groups, target).flops / dense)
                for method in names:
                    m = get_method(method)
                    try:
                        matcher = SampleMatcher(m, cfg, budget, mode, reference_rows=adapter.reference_rows)
                        got = [matcher.match(g, adapter.budget_units([hw]), 1) for g, hw in rows]
                    except MethodError:
                        cells[method] = "n/a"
                        continue
                    share = statistics.fmean(x.flops / count_flops(cfg, g) for x, (g, _) in zip(got, rows))
                    flag = "*" if not all(x.reachable for x in got) else ""
                    cells[method] = f"{share:.3f}{flag}"
                label = budget.name + (" (nominal)" if mode == "nominal" else "")
                vis = "/".join(str(g["vision"]) for g, _ in rows)
                lines.append("| " + " | ".join([name, label, vis, f"{statistics.fmean(targets):.3f}",
                                                "-" if mode == "nominal" else f"{statistics.fmean(dops):.3f}",
                                                *[cells.get(m, "") for m in sorted(METHODS)]]) + " |")
    return "\n".join(lines)


def pdrop_table() -> str:
    model, rows = samples("llava15_7b")
    cfg, groups = model.config, rows[0][0]
    pdrop = get_method("pdrop")
    lines = ["| budget | match | knob (first, lambda) | stages (layer: kept of 576) | avg kept | share of dense |",
             "|---|---|---|---|---|---|"]
    for k in (192, 128, 64):
        for mode, m in (("flops", match_budget(pdrop, cfg, groups, Budget("tokens", k))),
                        ("nominal", nominal_match(pdrop, cfg, groups, Budget("tokens", k)))):
            sched = pdrop.schedule(groups, 32, m.knob)
            stages = ", ".join(f"{layer}: {sched[layer]['vision']}" for layer, _ in pdrop.stages(32, m.knob))
            avg = sum(x["vision"] for x in sched) / 32
            lines.append(f"| tokens {k} | {mode} | {tuple(m.knob)} | {stages} | {avg:.1f} | "
                         f"{m.flops / count_flops(cfg, groups):.3f} |")
    return "\n".join(lines)


def sparsevlm_table() -> str:
    model, rows = samples("llava15_7b")
    cfg, groups = model.config, rows[0][0]
    sparse = get_method("sparsevlm")
    lines = ["| budget | row | knob | counts at layers 2/6/15 | equivalent tokens | share of dense | fits |",
             "|---|---|---|---|---|---|---|"]
    for k in (192, 128, 96, 64):
        b = Budget("tokens", k)
        for label, m in (("labelled", nominal_match(sparse, cfg, groups, b)),
                         ("matched", match_budget(sparse, cfg, groups, b))):
            counts = [c for _, c in sparse.stages(32, m.knob)]
            lines.append(f"| tokens {k} | {label} | {m.knob} | {counts} | {m.equivalent_tokens:.1f} | "
                         f"{m.flops / count_flops(cfg, groups):.3f} | {m.flops <= m.budget_flops * (1 + 1e-12)} |")
    return "\n".join(lines)


def main() -> int:
    print("## Mean share of dense prefill per method (3 image sizes; * = some sample unreachable)\n")
    print(shares_table())
    print("\n## PyramidDrop on LLaVA-1.5-7B\n")
    print(pdrop_table())
    print("\n## SparseVLM on LLaVA-1.5-7B\n")
    print(sparsevlm_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
