#!/usr/bin/env python
"""The one-command GPU check (``scripts/gpu_check.sh``, at most 8 minutes on one GPU).

On a LLaVA with a 7B-shaped decoder (``dop.bench.build_slice``: 32 x 4096 Llama, m=11008, 32 heads,
random weights, a one-layer CLIP stand-in tower, the LLaVA-1.5 prompt of 35 + 576 + 100 tokens), in
fp16, with SDPA and with FlashAttention-2 where ``flash_attn`` is installed, it prints one table per
attention kernel: prefill latency next to the FLOPs cut and their ratio for

- the stock model and the identity policy (the engine's overhead),
- DOP depth policies at the FLOPs of 192 / 128 / 64 visual tokens (vision attention pruned from one
  depth and vision MLP from another: the largest FLOPs within the budget),
- every registered baseline at 128 tokens (knob from ``match_budget``; a method that cannot reach 128
  on this shape runs at its nearest reachable budget, and says so);

with the peak GPU memory of each prefill (``torch.cuda.max_memory_allocated``), and the time of one DOP
sweep point (KL of one (type, group, depth) point on one calibration sample, dense reference built
once). Without CUDA it runs the same code on a small shape in fp32 on the CPU (this is how it is
tested; CPUs emulate fp16 matmuls, ~100x slower) and says so in its first line. Nothing is downloaded: random weights, token ids without a tokenizer.

    scripts/gpu_check.sh                       # auto: cuda + 7B shape, else cpu + small shape
    scripts/gpu_check.sh --shape 7b --device cuda --json gpu_check.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from dop.bench import BENCH_QUESTION, BenchRow, bench_text_tower, build_slice, run_bench
from dop.budget import Budget
from dop.divergence import CalibrationBatch
from dop.engine import prune
from dop.engine.baselines import MethodError, get_method, known_methods
from dop.engine.baselines.budget import budget_to_flops, knob_flops, match_budget
from dop.flops import count_flops, equivalent_tokens
from dop.policy import DepthPolicy, Policy
from dop.stages.bench import method_from_config
from dop.sweep import PointScorer, SweepJob, SweepPoint

PROMPT = {"n_system": 35, "n_vision": 576, "n_instruction": 100}  # LLaVA-1.5's prompt shape
SHAPES: dict[str, dict[str, int]] = {
    "7b": {"num_layers": 32, "hidden_size": 4096, "intermediate_size": 11008, "num_heads": 32, "num_kv_heads": 32,
           **PROMPT},
    # CPU mode: the same prompt, a narrow 4-layer decoder with GQA (what CI can afford)
    "small": {"num_layers": 4, "hidden_size": 128, "intermediate_size": 344, "num_heads": 4, "num_kv_heads": 2,
              **PROMPT},
}
DOP_BUDGETS = (192, 128, 64)  # equivalent visual tokens
BASELINE_BUDGET = 128


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def dop_policy(text_config: Any, groups: dict[str, int], tokens: int) -> tuple[Policy, str, float]:
    """The vision depth policy (attention from depth ``a``, MLP from ``m <= a``) with the largest
    dop-convention FLOPs within the FLOPs of ``tokens`` visual tokens in every layer."""
    L = text_config.num_hidden_layers
    budget = budget_to_flops(Budget("tokens", tokens), text_config, groups)
    best: tuple[float, int, int] | None = None
    for a in range(L + 1):
        for m in range(a + 1):
            policy = DepthPolicy({("attn", "vision"): a, ("mlp", "vision"): m}).expand(L)
            flops = count_flops(text_config, groups, policy=policy, convention="dop")
            if flops <= budget * (1 + 1e-12) and (best is None or (flops, a) > best[:2]):
                best = (flops, a, m)
    if best is None:
        raise ValueError(f"no vision depth policy reaches {tokens} tokens")
    flops, a, m = best
    return DepthPolicy({("attn", "vision"): a, ("mlp", "vision"): m}).expand(L), f"attn>={a} mlp>={m}", flops


def baselines(model: torch.nn.Module, groups: dict[str, int]) -> tuple[dict[str, tuple[Any, Any]], dict, dict]:
    """Every registered method at ``BASELINE_BUDGET`` tokens (or its nearest reachable budget):
    ({name: (method, knob)}, {name: budget note}, {name: why skipped})."""
    text = model.config.get_text_config(decoder=True)
    methods, notes, skipped = {}, {}, {}
    for name in known_methods():
        try:
            method = method_from_config(name)
            if getattr(method, "needs_text", False) and method.hparams.get("text_tower") is None:
                clip, tok = bench_text_tower(model)  # no CLIP text tower in the slice: a random CLIP-L one
                method = get_method(name, **{**method.hparams, "text_tower": clip, "text_tokenizer": tok})
            method.check_model(model)
        except (MethodError, ImportError) as err:
            skipped[name] = str(err).split(";")[0]
            continue
        try:
            knob = match_budget(method, model.config, groups, Budget("tokens", BASELINE_BUDGET)).knob
            notes[name] = str(BASELINE_BUDGET)
        except MethodError:  # cannot reach 128 here: its cheapest knob, the nearest reachable budget
            knob, flops = min(knob_flops(method, text, groups), key=lambda kf: kf[1])
            notes[name] = f"nearest {equivalent_tokens(text, groups, flops):.0f}"
        methods[name] = (method, knob)
    return methods, notes, skipped


def prefill_call(model: torch.nn.Module, inputs: dict, policy: Policy | None = None,
                 method: Any = None, knob: Any = None) -> Callable[[], None]:
    """One prefill as ``dop.bench.run_bench`` times it (last-position logits only)."""
    question = {"instruction": [BENCH_QUESTION]} if getattr(method, "needs_text", False) else {}

    def go() -> None:
        with torch.inference_mode():
            if method is not None:
                prepared = method.prepare_inputs(model, {**inputs, **question}, knob)
                with method.apply(model, knob):
                    model(**prepared, logits_to_keep=1)
            elif policy is not None:
                with prune(model, policy):
                    model(**inputs, logits_to_keep=1)
            else:
                model(**inputs, logits_to_keep=1)
    return go


def peak_memory_gib(calls: dict[str, Callable[[], None]], device: str) -> dict[str, float | None]:
    """Peak allocated GPU memory of each call (weights included); None on the CPU."""
    if not device.startswith("cuda"):
        return dict.fromkeys(calls)
    out = {}
    for name, fn in calls.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        out[name] = torch.cuda.max_memory_allocated() / 2**30
    return out


def sweep_point_seconds(model: torch.nn.Module, inputs: dict, repeats: int) -> dict[str, float]:
    """Time of the dense reference (one sample, hidden states kept) and of one sweep point: the KL of
    vision kv pruned from the middle layer, scored as ``dop.sweep`` scores it (prefix + half-layer reuse)."""
    score = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    score[:, -1] = True
    batch = CalibrationBatch(dict(inputs), score, ["gpu-check-0"])
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    with tempfile.TemporaryDirectory() as tmp:
        job = SweepJob(model, [batch], model_id="gpu-check", run_dir=tmp, pairs=[("kv", "vision")])
        device = next(model.parameters()).device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        start = time.perf_counter()
        job.reference.build(model, job.adapter.decoder_layers(), device)
        sync()
        reference_s = time.perf_counter() - start
        scorer = PointScorer(model, job.reference, adapter=job.adapter)
        point = SweepPoint("kv", "vision", L // 2)
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            record = scorer.score_point(point)
            sync()
            times.append(time.perf_counter() - start)
    return {"reference_s": reference_s, "point_s": statistics.median(times[1:]), "point": point.key,
            "kl": record["kl"], "layer_forwards": record["layer_forwards"]}


def format_table(attn: str, rows: list[BenchRow], budgets: dict[str, str], knobs: dict[str, str],
                 memory: dict[str, float | None]) -> str:
    lines = ["| attn | run | budget (tokens) | knob | TFLOPs | FLOPs cut | latency (ms) | latency cut | "
             "latency/FLOPs cut | peak mem (GiB, weights incl.) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r.ratio:.3f}" if r.flops_reduction > 0 else "-"
        mem = memory.get(r.policy)
        lines.append(f"| {attn} | {r.policy} | {budgets.get(r.policy, '-')} | {knobs.get(r.policy, '-')} | "
                     f"{r.flops / 1e12:.4f} | {100 * r.flops_reduction:.1f}% | {1e3 * r.latency_s:.2f} | "
                     f"{100 * r.latency_reduction:+.1f}% | {ratio} | {'-' if mem is None else f'{mem:.2f}'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    ap.add_argument("--shape", default="auto", choices=["auto", *SHAPES], help="auto: 7b on cuda, small on cpu")
    ap.add_argument("--dtype", default="auto", help="auto: float16 on cuda, float32 on cpu (CPUs emulate fp16)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10 on cuda, 2 on cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--time-limit", type=float, default=420.0, help="seconds; later passes are skipped past it")
    ap.add_argument("--json", default=None, help="also write every row here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    mode = "gpu" if device.startswith("cuda") else "cpu"
    shape_name = args.shape if args.shape != "auto" else ("7b" if mode == "gpu" else "small")
    shape = SHAPES[shape_name]
    dtype_name = args.dtype if args.dtype != "auto" else ("float16" if mode == "gpu" else "float32")
    dtype = getattr(torch, dtype_name)
    repeats = args.repeats or (10 if mode == "gpu" else 2)
    kernels = ["sdpa", *(["flash_attention_2"] if mode == "gpu" and flash_attn_available() else [])]
    print(f"gpu_check: mode={mode} device={describe_device(device)} dtype={dtype_name} shape={shape_name} "
          f"({shape['num_layers']} layers, d={shape['hidden_size']}, m={shape['intermediate_size']}, "
          f"heads {shape['num_heads']}/{shape['num_kv_heads']} KV; prompt {shape['n_system']}+{shape['n_vision']}+"
          f"{shape['n_instruction']} tokens; 1-layer CLIP stand-in tower, random weights) kernels={kernels} "
          f"torch={torch.__version__} transformers={transformers.__version__}", flush=True)

    model, inputs, groups = build_slice(**shape, dtype=dtype, device=device, attn_implementation="sdpa")
    text = model.config.get_text_config(decoder=True)
    built_s = time.perf_counter() - t0
    policies: dict[str, Policy | None] = {"stock": None, "identity": Policy()}
    budgets, knobs = {}, {}
    for tokens in DOP_BUDGETS:
        policy, knob, _ = dop_policy(text, groups, tokens)
        policies[f"dop@{tokens}"] = policy
        budgets[f"dop@{tokens}"], knobs[f"dop@{tokens}"] = str(tokens), knob
    methods, notes, skipped = baselines(model, groups)
    budgets.update(notes)
    knobs.update({name: str(knob) for name, (_, knob) in methods.items()})

    results: dict[str, Any] = {"mode": mode, "device": describe_device(device), "dtype": dtype_name,
                               "shape": {"name": shape_name, **shape}, "kernels": {}, "skipped": {}}
    for attn in kernels:
        if time.perf_counter() - t0 > args.time_limit:
            results["skipped"][attn] = "time limit"
            print(f"skipped {attn}: past --time-limit {args.time_limit:.0f} s")
            continue
        try:
            model.set_attn_implementation(attn)
        except (ValueError, ImportError) as err:  # e.g. a flash_attn build that does not fit this GPU
            results["skipped"][attn] = str(err)
            print(f"skipped {attn}: {err}")
            continue
        failed: dict[str, str] = {}
        rows = run_bench(model, inputs, groups, policies=policies, repeats=repeats, warmup=2 if mode == "gpu" else 1,
                         methods=methods, skipped=failed)
        calls = {name: prefill_call(model, inputs, policy=p) for name, p in policies.items()}
        calls.update({name: prefill_call(model, inputs, method=m, knob=k) for name, (m, k) in methods.items()
                      if name not in failed})
        memory = peak_memory_gib(calls, device)
        by = {r.policy: r for r in rows}
        overhead = by["identity"].latency_s / by["stock"].latency_s - 1
        print(f"\n{format_table(attn, rows, budgets, knobs, memory)}")
        print(f"identity overhead vs stock ({attn}): {100 * overhead:+.2f}%")
        for name, why in failed.items():
            print(f"failed {name} ({attn}): {why}")
        results["kernels"][attn] = {"rows": [{**r.__dict__, "knob": knobs.get(r.policy), "budget":
                                              budgets.get(r.policy), "peak_mem_gib": memory.get(r.policy)}
                                             for r in rows],
                                    "identity_overhead": overhead, "failed": failed}
    model.set_attn_implementation("sdpa")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    results["skipped"].update(skipped)

    if time.perf_counter() - t0 <= args.time_limit:
        sweep = sweep_point_seconds(model, inputs, repeats=min(repeats, 3))
        print(f"DOP sweep point {sweep['point']} (1 sample, sdpa): {sweep['point_s']:.3f} s "
              f"({sweep['layer_forwards']:.1f} layer forwards; dense reference {sweep['reference_s']:.3f} s); "
              f"KL {sweep['kl']:.4g}")
        results["sweep_point"] = sweep
    else:
        results["skipped"]["sweep_point"] = "time limit"
        print(f"skipped the sweep point: past --time-limit {args.time_limit:.0f} s")
    peak = (torch.cuda.max_memory_allocated() / 2**30 if mode == "gpu"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    results.update(peak_gib=peak, build_s=built_s, total_s=time.perf_counter() - t0)
    print(f"peak memory: {peak:.2f} GiB ({'torch.cuda.max_memory_allocated' if mode == 'gpu' else 'process RSS'}); "
          f"model built in {built_s:.1f} s; total {results['total_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
