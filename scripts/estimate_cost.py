"""GPU-hour estimates of the paper-table experiments (conf/experiment/*.yaml), from exact FLOPs.

    python scripts/estimate_cost.py                 # every experiment, Markdown table + details
    python scripts/estimate_cost.py main_table      # one experiment
    python scripts/estimate_cost.py --mfu 0.3       # another throughput assumption
    python scripts/estimate_cost.py --write-headers # refresh the `# Cost:` block of every experiment

FLOPs are exact for the stated shapes: ``dop.flops.count_flops`` (decoder prefill in the dop
convention, 2 FLOPs per multiply-add, SwiGLU, GQA widths; single-token decode steps and the
last-position LM head included) plus ``dop.flops.vision_flops`` (vision tower + projector). What is
*not* exact, and stated as such in the output:

- token counts per sample (system / visual / instruction / answer) are typical values, not
  measured on the datasets (Qwen2(.5)-VL and InternVL3 visual counts depend on image resolution);
- benchmark sizes are the lmms-eval task sizes as documented, not counted here;
- throughput is ASSUMED, not measured (no GPU was available when these numbers were made): an
  A100-80GB (bf16 dense peak 312 TFLOP/s) reaching ``--mfu`` of peak on batch-1 prefill, decode
  steps bound by reading the weights at ``--bw-eff`` of 2.0 TB/s, plus ``--overhead`` seconds of
  per-sample host work (preprocessing, lmms-eval bookkeeping);
- the sweep cost assumes plain prefix reuse (a point at depth d recomputes layers d..L-1; the
  sweep's half-layer reuse is cheaper), so it is an upper bound, and random policies of the
  additive check are counted at dense cost (also an upper bound).
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

from dop.flops import VisionShape, count_flops, flops_for_tokens, vision_flops

# --- model shapes (from the models' config.json on the hub) ----------------------------------------
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064)
VICUNA_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40, vocab_size=32064)
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064)
CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, image_size=336, patch_size=14)


@dataclass(frozen=True)
class ModelSpec:
    text: dict
    vision: VisionShape
    images: int  # crops / tiles run through the vision tower per sample
    visual_tokens: int  # visual tokens entering the decoder
    system_tokens: int
    note: str = ""

    @property
    def params(self) -> float:
        t = self.text
        d, m, L = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
        dkv = d // t["num_attention_heads"] * t["num_key_value_heads"]
        v = self.vision
        vis = v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
        return L * (2 * d * d + 2 * d * dkv + 3 * d * m) + 2 * t["vocab_size"] * d + vis


MODELS: dict[str, ModelSpec] = {
    "llava15_7b": ModelSpec(VICUNA_7B, VisionShape(**CLIP_L336, projector_in=1024, projector_out=4096), 1, 576, 35),
    "llava15_13b": ModelSpec(VICUNA_13B, VisionShape(**CLIP_L336, projector_in=1024, projector_out=5120), 1, 576, 35),
    "llava_next_7b": ModelSpec(VICUNA_7B, VisionShape(**CLIP_L336, projector_in=1024, projector_out=4096), 5, 2880, 35,
                               "anyres 2x2 + base crop: 5 crops, 2880 visual tokens (paper-notes 4)"),
    "qwen2vl_7b": ModelSpec(QWEN2_7B, VisionShape(hidden_size=1280, intermediate_size=5120, num_layers=32,
                                                  image_size=560, patch_size=14, cls_token=False,
                                                  projector_in=5120, projector_out=3584), 1, 400, 20,
                            "assumed 560x560 input: 1600 patches, 2x2 merge -> 400 visual tokens"),
    "qwen25vl_7b": ModelSpec(QWEN2_7B, VisionShape(hidden_size=1280, intermediate_size=3420, num_layers=32,
                                                   image_size=560, patch_size=14, cls_token=False,
                                                   projector_in=5120, projector_out=3584), 1, 400, 20,
                             "assumed 560x560 input -> 400 visual tokens; windowed ViT counted as full attention"),
    "internvl3_8b": ModelSpec(QWEN2_7B, VisionShape(hidden_size=1024, intermediate_size=4096, num_layers=24,
                                                    image_size=448, patch_size=14, projector_in=4096,
                                                    projector_out=3584), 7, 1792, 20,
                              "assumed 6 tiles + thumbnail at 448 px, 256 tokens each after pixel shuffle"),
}

# --- benchmarks: lmms-eval task size, typical instruction tokens, answer tokens (incl. EOS) ---------
BENCHMARKS: dict[str, tuple[int, int, int]] = {
    "gqa": (12578, 45, 4),
    "mmbench_en_dev": (4377, 120, 2),
    "mmbench_cn_dev": (4329, 140, 2),
    "mme": (2374, 35, 2),
    "pope": (9000, 30, 2),
    "scienceqa_img": (2017, 120, 2),
    "vqav2_val": (214354, 35, 4),
    "textvqa_val": (5000, 40, 6),
    "vizwiz_vqa_val": (4319, 50, 6),
    "mmmu_val": (900, 200, 4),
    "seedbench": (17990, 90, 2),
    "ocrbench": (1000, 30, 12),
    "ok_vqa_val2014": (5046, 35, 4),
}
PAPER13 = list(BENCHMARKS)
ABLATION_BENCHMARKS = ["gqa", "mme", "pope", "textvqa_val"]
METHODS = ["dop_paper", "fastv", "pdrop", "sparsevlm", "visionzip", "prumerge_plus", "trim", "dart", "divprune",
           "fastervlm", "vispruner", "cdpruner", "vtw"]
MAIN_BUDGETS = {"llava15_7b": ("tokens", [192, 128, 64]), "llava15_13b": ("tokens", [192, 128, 64]),
                "llava_next_7b": ("tokens", [640, 320, 160])}
MAIN_RATIOS = [0.453, 0.363, 0.275]  # the other three models (conf/experiment/main_table.yaml)
CALIBRATION = 64  # method.num_calibration
CALIBRATION_TOKENS = ("gqa", 45)  # calibration prompts look like GQA's
SEARCH_PAIRS = 9  # 3 op types x 3 groups (method=dop)
PAPER_SEARCH = {"pairs": 2, "nv_points": 5}  # method=dop_paper: attn + mlp on vision, 5 reduced n_v values


@dataclass
class Throughput:
    peak_tflops: float = 312.0  # A100 bf16 dense peak
    mfu: float = 0.4  # ASSUMED share of peak reached by batch-1 prefill
    bandwidth_tbs: float = 2.0  # A100-80GB HBM2e
    bw_eff: float = 0.7  # ASSUMED share of bandwidth reached by decode steps
    overhead_s: float = 0.10  # ASSUMED host-side seconds per evaluated sample

    def seconds(self, flops: float, decode_steps: float, params: float, forwards: float = 1.0) -> float:
        compute = flops / (self.peak_tflops * 1e12 * self.mfu)
        memory = decode_steps * 2 * params / (self.bandwidth_tbs * 1e12 * self.bw_eff)
        return compute + memory + forwards * self.overhead_s


# --- per-sample FLOPs -------------------------------------------------------------------------------
def groups_of(spec: ModelSpec, instruction: int) -> dict[str, int]:
    return {"system": spec.system_tokens, "vision": spec.visual_tokens, "instruction": instruction}


def decoder_prefill(spec: ModelSpec, instruction: int, budget: tuple[str, float] | None = None) -> float:
    """Exact decoder prefill FLOPs (dop convention) of one sample, dense or at a budget."""
    groups = groups_of(spec, instruction)
    dense = count_flops(spec.text, groups, convention="dop")
    if budget is None:
        return dense
    kind, value = budget
    if kind == "ratio":
        return value * dense
    if kind == "tokens":
        return flops_for_tokens(spec.text, groups, value, convention="dop")
    raise ValueError(kind)


def sample_flops(spec: ModelSpec, bench: str, budget: tuple[str, float] | None = None) -> tuple[float, int]:
    """(FLOPs of one evaluated sample, decode steps): vision + pruned prefill + head + dense decode."""
    _, instruction, answer = BENCHMARKS[bench]
    groups = groups_of(spec, instruction)
    vision = vision_flops(spec.vision, spec.images)
    prefill = decoder_prefill(spec, instruction, budget)
    head_and_decode = (count_flops(spec.text, groups, convention="dop", decode_tokens=answer - 1, lm_head="last")
                       - count_flops(spec.text, groups, convention="dop"))
    return vision + prefill + head_and_decode, answer - 1


@dataclass
class Cost:
    flops: float = 0.0
    seconds: float = 0.0
    label: str = ""

    def __iadd__(self, other: Cost) -> Cost:
        self.flops += other.flops
        self.seconds += other.seconds
        return self


@functools.cache
def _sample_flops(model: str, bench: str, budget) -> tuple[float, int]:
    return sample_flops(MODELS[model], bench, budget)


def eval_cost(model: str, bench: str, budget, tp: Throughput, limit: int | None = None) -> Cost:
    spec = MODELS[model]
    n = BENCHMARKS[bench][0] if limit is None else min(limit, BENCHMARKS[bench][0])
    f, steps = _sample_flops(model, bench, budget)
    return Cost(n * f, n * tp.seconds(f, steps, spec.params))


def search_cost(model: str, tp: Throughput, num_calibration: int = CALIBRATION, grid_step: int = 1,
                budgets: int = 3, check_additive: int = 0, pairs: int = SEARCH_PAIRS, nv_points: int = 0) -> Cost:
    """Dense reference + sweep (prefix reuse, upper bound) + measured policies, on the calibration set.
    ``nv_points``: n_v curve points, each a whole forward (counted at dense cost: an upper bound)."""
    spec = MODELS[model]
    L = spec.text["num_hidden_layers"]
    _, instruction = CALIBRATION_TOKENS
    dense = decoder_prefill(spec, instruction)
    reference = vision_flops(spec.vision, spec.images) + dense
    depths = list(range(0, L, grid_step))  # depth L is dense: free
    sweep = pairs * sum((L - d) / L for d in depths) * dense
    measured = (budgets + check_additive + nv_points) * dense
    flops = num_calibration * (reference + sweep + measured)
    forwards = num_calibration * (1 + pairs * len(depths) + budgets + check_additive + nv_points) / 8  # batches of 8
    return Cost(flops, flops / (tp.peak_tflops * 1e12 * tp.mfu) + forwards * tp.overhead_s)


def budgets_for(model: str) -> list[tuple[str, float]]:
    if model in MAIN_BUDGETS:
        kind, values = MAIN_BUDGETS[model]
        return [(kind, v) for v in values]
    return [("ratio", v) for v in MAIN_RATIOS]


# --- the experiments ----------------------------------------------------------------------------------
@dataclass
class Estimate:
    name: str
    jobs: int
    cost: Cost
    longest_job_s: float
    note: str
    longest_job: str = ""


def _job(model: str, bench: str, budgets, tp: Throughput, search: dict | None, dense: bool = True,
         limit: int | None = None) -> Cost:
    c = Cost()
    c.label = f"{model} / {bench}"
    if search is not None:
        c += search_cost(model, tp, **search)
    if dense:
        c += eval_cost(model, bench, None, tp, limit)
    for b in budgets:
        c += eval_cost(model, bench, b, tp, limit)
    return c


def estimate(name: str, tp: Throughput) -> Estimate:
    total, longest, jobs, longest_label = Cost(), 0.0, 0, ""

    def add(c: Cost) -> None:
        nonlocal total, longest, jobs, longest_label
        total += c
        if c.seconds > longest:
            longest, longest_label = c.seconds, c.label
        jobs += 1

    if name in ("main_table", "main_table_search"):
        # one search per model (the search store): main_table_search runs them; in main_table alone the
        # first DOP cell of each model does (the others reuse it), so both count them
        for model in MODELS:
            c = search_cost(model, tp, **PAPER_SEARCH)
            c.label = f"{model} / search"
            if name == "main_table_search":
                add(c)
                continue
            for method in METHODS:
                for i, bench in enumerate(PAPER13):  # dense once per (model, benchmark): the store skips it after
                    job = _job(model, bench, budgets_for(model), tp, None, dense=method == "dop_paper")
                    if method == "dop_paper" and i == 0:
                        job += c
                    add(job)
        note = ("6 models, one dop_paper search each" if name == "main_table_search" else
                "6 models x 13 methods x 13 benchmarks; one search per model; dense once per (model, benchmark)")
    elif name == "latency":
        for method in METHODS:
            add(_job("llava_next_7b", "gqa", [("ratio", 0.23), ("ratio", 0.14)], tp,
                     {"budgets": 2, **PAPER_SEARCH} if method == "dop_paper" else None, dense=method == "dop_paper",
                     limit=1000))
        note = "llava_next_7b, 13 methods x 2 budgets, 1000 GQA samples each"
    elif name == "ablation_additive":
        for model in ("llava15_7b", "llava_next_7b", "qwen25vl_7b"):
            c = search_cost(model, tp, check_additive=100)
            c.label = model
            add(c)
        note = "3 models, search + 100 jointly measured random policies each"
    elif name in ("ablation_data", "ablation_time", "ablation_space", "ablation_objective"):
        model = "llava15_7b" if name == "ablation_objective" else "llava_next_7b"
        budgets = ([("ratio", v) for v in (0.5, 0.25, 0.14)] if name == "ablation_space" else budgets_for(model))
        variants = {"ablation_data": [{"num_calibration": n} for n in (8, 25, 50, 100)],
                    "ablation_time": [{"grid_step": g} for g in (1, 2, 4)],
                    "ablation_space": [{"pairs": 9}, {"pairs": 6}, {"pairs": 3}],
                    "ablation_objective": [{}, {}, {}]}[name]
        for i, search in enumerate(variants):
            for j, bench in enumerate(ABLATION_BENCHMARKS):  # one search per variant (the store), in its first cell
                add(_job(model, bench, budgets, tp, search if j == 0 else None, dense=i == 0))
        note = f"{model}, {len(variants)} variants x {len(ABLATION_BENCHMARKS)} benchmarks (gqa, mme, pope, textvqa_val)"
        if name == "ablation_objective":
            note += "; the accuracy objective assumed to cost what the KL sweep does"
    elif name == "ablation_nv":
        budgets = [("ratio", v) for v in (0.5, 0.25, 0.14)]
        for i, search in enumerate([{}, {"nv_points": 5}]):
            for j, bench in enumerate(ABLATION_BENCHMARKS):
                add(_job("llava15_7b", bench, budgets, tp, search if j == 0 else None, dense=i == 0))
        note = "llava15_7b, 2 variants (no front end, joint n_v) x 4 benchmarks (gqa, mme, pope, textvqa_val)"
    elif name == "ablation_transfer":
        for target in ("llava15_7b", "llava_next_7b"):
            for source in ("llava15_7b", "llava_next_7b"):
                for bench in ABLATION_BENCHMARKS:
                    add(_job(target, bench, budgets_for(source), tp, None, dense=source == target))
        note = "2 targets x 2 sources x 4 benchmarks, evaluation only (sources come from main_table)"
    else:
        raise SystemExit(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return Estimate(name, jobs, total, longest, note, longest_label)


def cost_header(e: Estimate, tp: Throughput) -> list[str]:
    """The ``# Cost:`` block of an experiment's YAML header."""
    return [
        f"# Cost:     {e.cost.seconds / 3600:,.1f} GPU-hours at an ASSUMED A100 throughput ({tp.mfu:.0%} of peak on",
        f"#           prefill, decode at {tp.bw_eff:.0%} of {tp.bandwidth_tbs:g} TB/s, {tp.overhead_s:g} s/sample overhead; not measured)",
        f"#           for {e.cost.flops / 1e15:,.1f} PFLOPs, exact for the stated shapes and token counts;",
        f"#           {e.jobs} jobs, the longest {e.longest_job_s / 3600:.2f} h ({e.longest_job}).",
        "#           From `python scripts/estimate_cost.py` (assumptions in its docstring).",
    ]


def write_headers(tp: Throughput, conf_dir: Path) -> None:
    """Replace the ``# Cost:`` block of every conf/experiment/<name>.yaml with the current estimate."""
    for name in EXPERIMENTS:
        path = conf_dir / f"{name}.yaml"
        lines = path.read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("# Cost:"))
        end = start + 1
        while end < len(lines) and lines[end].startswith("#   "):
            end += 1
        lines[start:end] = cost_header(estimate(name, tp), tp)
        path.write_text("\n".join(lines) + "\n")
        print(f"updated {path}")


EXPERIMENTS = ["main_table", "main_table_search", "latency", "ablation_additive", "ablation_data", "ablation_time", "ablation_transfer",
               "ablation_space", "ablation_objective", "ablation_nv"]


def header(tp: Throughput) -> str:
    return (f"ASSUMED throughput: A100-80GB, {tp.mfu:.0%} of {tp.peak_tflops:g} TFLOP/s on prefill, decode at "
            f"{tp.bw_eff:.0%} of {tp.bandwidth_tbs:g} TB/s, {tp.overhead_s:g} s/sample host overhead (not measured)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiments", nargs="*", default=EXPERIMENTS)
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--bw-eff", type=float, default=0.7)
    ap.add_argument("--overhead", type=float, default=0.10)
    ap.add_argument("--write-headers", action="store_true",
                    help="rewrite the '# Cost:' block of every conf/experiment/*.yaml")
    args = ap.parse_args(argv)
    tp = Throughput(mfu=args.mfu, bw_eff=args.bw_eff, overhead_s=args.overhead)
    if args.write_headers:
        write_headers(tp, Path(__file__).resolve().parent.parent / "conf" / "experiment")
        return 0
    print(header(tp))
    print()
    print("| experiment | jobs | PFLOPs (exact for the stated shapes) | GPU-hours (assumed throughput) | longest job (h) |")
    print("|---|---|---|---|---|")
    rows = [estimate(n, tp) for n in args.experiments]
    for e in rows:
        print(f"| {e.name} | {e.jobs} | {e.cost.flops / 1e15:,.1f} | {e.cost.seconds / 3600:,.1f} | "
              f"{e.longest_job_s / 3600:.2f} |")
    print()
    for e in rows:
        print(f"- {e.name}: {e.note}")
    print()
    print("Per-sample FLOPs (vision + dense prefill + head + decode, TFLOPs) and dense prefill (decoder only):")
    for model, spec in MODELS.items():
        f, _ = sample_flops(spec, "gqa")
        print(f"- {model}: {f / 1e12:.2f} per GQA sample; decoder prefill {decoder_prefill(spec, 45) / 1e12:.2f}; "
              f"{spec.params / 1e9:.1f} B params" + (f" ({spec.note})" if spec.note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
