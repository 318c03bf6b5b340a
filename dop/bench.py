"""Engine latency benchmark: prefill latency of dense vs pruned policies next to their FLOPs.

On a CPU it runs a real-width decoder slice (``dop stage=bench`` uses LLaMA-7B width, a few layers,
random weights and the LLaVA-1.5 prompt shape: ``conf/bench/default.yaml``); on a GPU the same slice. It prints,
per policy, the FLOPs reduction, the latency reduction and their ratio (1.0 = latency falls as
fast as FLOPs). ``dop stage=bench`` (``dop.stages.bench``) calls :func:`run_bench`.

Baselines run beside the policies at one budget, each at the knob budget matching gives it
(``dop.engine.baselines.budget``; hyper-parameters from ``conf/method/<name>.yaml``)::

    dop stage=bench bench.methods=[fastv,pdrop,visionzip] bench.budget=tokens:128 num_threads=1
    dop stage=bench bench.methods=all            # every registered method, at cfg.budget's first value
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from dop.clip_tokenizer import clip_tokenizer
from dop.engine import prune
from dop.engine.baselines.budget import method_flops
from dop.flops import count_flops, num_layers
from dop.flops import text_config as flops_text_config
from dop.ops import INSTRUCTION, SYSTEM, VISION
from dop.policy import DepthPolicy, Policy

log = logging.getLogger(__name__)


@dataclass
class BenchRow:
    policy: str
    flops: float  # decoder prefill FLOPs, dop convention
    flops_reduction: float
    latency_s: float  # median prefill latency (whole model: vision tower, decoder, last-position head)
    latency_reduction: float
    ratio: float  # latency_reduction / flops_reduction
    knob: Any = None  # a baseline's matched knob (None for policies)




def build_slice(
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
    n_system: int,
    n_vision: int,
    n_instruction: int,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str = "cpu",
    seed: int = 0,
):
    """A random-weight ``LlavaForConditionalGeneration`` of real decoder width and its inputs.

    The vision tower is a one-layer CLIP sized so its patch count equals ``n_vision`` (a square);
    the vocabulary is small because only the last position's logits are computed.
    """
    side = int(round(n_vision**0.5))
    if side * side != n_vision:
        raise ValueError(f"n_vision={n_vision} must be a square number of patches")
    torch.manual_seed(seed)
    vocab, image_id = 1024, 3
    vcfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                            image_size=side * 14, patch_size=14, projection_dim=64)
    tcfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       num_key_value_heads=num_kv_heads, max_position_embeddings=4096,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=image_id,
                      image_seq_length=n_vision, vision_feature_select_strategy="default", vision_feature_layer=-1)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(10, vocab, (1, n_system + n_instruction), generator=g)
    input_ids = torch.cat([text[:, :n_system], torch.full((1, n_vision), image_id), text[:, n_system:]], dim=1)
    inputs = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": torch.randn(1, 3, side * 14, side * 14, generator=g).to(device, dtype),
    }
    groups = {SYSTEM: n_system, VISION: n_vision, INSTRUCTION: n_instruction}
    return model, inputs, groups


BENCH_QUESTION = "what is the colour of the object in the top left corner of the image ?"


def bench_text_tower(model) -> tuple[Any, Any]:
    """A random-weight CLIP-L/14-shaped text tower (12 x 768, 77 positions) whose visual projection
    reads the slice's vision tower, and an offline CLIP tokenizer: text-guided methods (TRIM,
    CDPruner) then pay a real text-encoding cost on the slice. Their selections are arbitrary (random
    weights); only the latency means something."""
    tok = clip_tokenizer(BENCH_QUESTION.split(), model_max_length=77)
    vision = model.config.vision_config
    text = dict(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vcfg = dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size, num_hidden_layers=1,
                num_attention_heads=vision.num_attention_heads, image_size=vision.image_size,
                patch_size=vision.patch_size)
    device = next(model.parameters()).device
    with torch.device(device):
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vcfg, projection_dim=768)).eval()
    return clip, tok


def default_policies(num_layers: int) -> dict[str, Policy | None]:
    """Stock model, identity policy, and pruned policies from mild to > 75% of decoder FLOPs."""
    return {
        "stock": None,
        "identity": Policy(),
        "vision_mlp_from_1": DepthPolicy({("mlp", VISION): 1}).expand(num_layers),
        "vision_from_1": DepthPolicy({("attn", VISION): 1, ("mlp", VISION): 1}).expand(num_layers),
        "vision_from_0": DepthPolicy({("attn", VISION): 0, ("mlp", VISION): 0}).expand(num_layers),
    }


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def _time(fn, repeats: int, warmup: int, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(now() - start)
    return statistics.median(times) if times else 0.0


def _policy_call(model, inputs: dict, policy: Policy | None):
    def go():
        with torch.inference_mode():
            if policy is None:
                model(**inputs, logits_to_keep=1)
            else:
                with prune(model, policy):
                    model(**inputs, logits_to_keep=1)
    return go


def _method_call(model, inputs: dict, method: Any, knob: Any):
    question = {"instruction": [BENCH_QUESTION]} if getattr(method, "needs_text", False) else {}

    def go():  # the method's input reduction (text encoding included) is part of its prefill cost
        with torch.inference_mode():
            prepared = method.reduce_inputs(model, {**inputs, **question}, knob)
            with method.apply(model, knob):
                model(**prepared, logits_to_keep=1)
    return go


def _interleaved(calls: Mapping[str, Any], warm: set[str], repeats: int, warmup: int, clock: str
                 ) -> dict[str, float]:
    """Median latency per call over ``repeats`` interleaved rounds (so drift hits all alike)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for name in warm:  # warm-up each policy path once (methods were warmed when they were checked)
        _time(calls[name], repeats=0, warmup=warmup)
    for _ in range(repeats):
        for name, fn in calls.items():
            samples[name].append(_time(fn, repeats=1, warmup=0, clock=clock))
    return {name: statistics.median(times) for name, times in samples.items()}


def _row(name: str, flops: float, dense_flops: float, latency: float, base: float | None,
         knob: Any = None) -> BenchRow:
    f_red = 1 - flops / dense_flops
    l_red = 1 - latency / base if base else float("nan")
    return BenchRow(name, flops, f_red, latency, l_red, l_red / f_red if f_red > 0 else float("nan"), knob=knob)


def run_bench(
    model=None,
    inputs: dict | None = None,
    groups: dict | None = None,
    policies: dict[str, Policy | None] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    methods: Mapping[str, tuple[Any, Any]] | None = None,
    skipped: dict[str, str] | None = None,
    clock: str = "wall",
    **slice_kwargs,
) -> list[BenchRow]:
    """Time every policy and every baseline ``methods[name] = (Method, knob)`` (interleaved rounds,
    so drift hits all alike) and compare with FLOPs. A method that fails its warm-up is left out
    and its error goes to ``skipped`` (when given). ``clock``: ``wall`` or ``process`` (CPU time of this
    process: other jobs' time slices on a shared machine are not counted)."""
    if model is None:
        model, inputs, groups = build_slice(**slice_kwargs)
    text_config = flops_text_config(model)
    policies = policies if policies is not None else default_policies(num_layers(model))
    calls = {name: _policy_call(model, inputs, policy) for name, policy in policies.items()}
    for name, (method, knob) in (methods or {}).items():
        fn = _method_call(model, inputs, method, knob)
        try:
            _time(fn, repeats=0, warmup=1)
        except Exception as err:  # one method's failure must not lose the others' timings
            log.warning("bench: %s failed at knob %s: %s", name, knob, err)
            if skipped is not None:
                skipped[name] = f"{type(err).__name__}: {err}"
            continue
        calls[name] = fn
    latency = _interleaved(calls, set(policies), repeats, warmup, clock)
    dense_flops = count_flops(text_config, groups=groups, policy=Policy(), convention="dop")
    base = latency.get("stock")
    rows = [_row(name, count_flops(text_config, groups=groups, policy=policy or Policy(), convention="dop"),
                 dense_flops, latency[name], base) for name, policy in policies.items()]
    rows += [_row(name, method_flops(method, text_config, groups, knob), dense_flops, latency[name], base, knob)
             for name, (method, knob) in (methods or {}).items() if name in latency]
    return rows


def format_rows(rows: list[BenchRow]) -> str:
    lines = ["| policy | TFLOPs | FLOPs cut | latency (s) | latency cut | cut ratio |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.flops_reduction <= 0 else f"{r.ratio:.3f}"
        name = r.policy if r.knob is None else f"{r.policy} (knob {r.knob})"
        lines.append(f"| {name} | {r.flops / 1e12:.3f} | {100 * r.flops_reduction:.1f}% | {r.latency_s:.3f} | "
                     f"{100 * r.latency_reduction:+.1f}% | {ratio} |")
    return "\n".join(lines)


