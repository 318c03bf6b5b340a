#!/usr/bin/env python
"""Sweep cost with and without prefix reuse: layer forwards and wall time (same divergences).

Builds a wider random-weight decoder on the embedded tiny model's vision tower and processor (so the
layer compute, not Python overhead, dominates as it does at 7B), runs the single-change sweep with
``reuse=none|prefix|half_layer`` on calibration samples of the synthetic data, and prints each
mode's layer-forward ratio, sweep wall time and ratio, and the largest KL difference to the naive
sweep.

    python scripts/bench_sweep.py --hidden 1024 --layers 8 --samples 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def build(hidden: int, layers: int, seed: int = 0):
    from transformers import LlavaForConditionalGeneration

    from dop.models import load_model

    tiny, processor = load_model("tiny_llava")
    cfg = tiny.config
    text = cfg.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, int(hidden * 2.75), layers
    text.num_attention_heads = text.num_key_value_heads = max(1, hidden // 64)
    text.head_dim = 64
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    return model, processor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dop.data.synthetic import ensure_dataset, load_dataset_dir
    from dop.divergence import calibration_batches
    from dop.sweep import SweepJob

    model, processor = build(args.hidden, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        data = load_dataset_dir(ensure_dataset(Path(tmp) / "data", seed=0,
                                               sizes={"train": 1, "val": args.samples, "test": 1}))["val"]
        samples = [{"id": str(i), "image": r["image"], "question": r["question"]} for i, r in enumerate(data)]
        batches = calibration_batches(processor, samples, 8, model=model)
        results = {}
        for mode in ("none", "prefix", "half_layer"):
            job = SweepJob(model, batches, model_id="bench", run_dir=Path(tmp) / mode, reuse=mode)
            job.reference  # dense reference outside the timed part  # noqa: B018
            start = time.perf_counter()
            stats = job.run()
            seconds = time.perf_counter() - start
            kls = {p.key: job.store.read(p)["kl"] for p in job.points()}
            results[mode] = (stats["reuse_ratio"], seconds, kls)
    base = results["none"][1]
    print(f"decoder: {args.layers} layers, hidden {args.hidden}; {args.samples} calibration samples; "
          f"{torch.get_num_threads()} thread(s)")
    print("| reuse | layer forwards / naive | sweep wall time (s) | wall / naive | max |KL - naive KL| |")
    print("|---|---|---|---|---|")
    for mode, (ratio, seconds, kls) in results.items():
        diff = max(abs(kls[k] - results["none"][2][k]) for k in kls)
        print(f"| {mode} | {ratio:.3f} | {seconds:.2f} | {seconds / base:.3f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
