#!/usr/bin/env python
"""Engine latency benchmark without Hydra (same code as `dop stage=bench`).

    python scripts/bench_engine.py --threads 1                 # conf/bench/default.yaml: 7B width, 4 layers
    python scripts/bench_engine.py --layers 2 --hidden 1024 --intermediate 2752 --heads 8
"""

from __future__ import annotations

import argparse
import json

import torch

from dop.bench import format_rows, run_bench, slice_defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = slice_defaults()  # conf/bench/default.yaml, the same shape `dop stage=bench` uses
    ap.add_argument("--layers", type=int, default=d["num_layers"])
    ap.add_argument("--hidden", type=int, default=d["hidden_size"])
    ap.add_argument("--intermediate", type=int, default=d["intermediate_size"])
    ap.add_argument("--heads", type=int, default=d["num_heads"])
    ap.add_argument("--kv-heads", type=int, default=d["num_kv_heads"])
    ap.add_argument("--tokens", type=int, nargs=3, default=[d["n_system"], d["n_vision"], d["n_instruction"]],
                    metavar=("SYSTEM", "VISION", "INSTR"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_bench(repeats=args.repeats, num_layers=args.layers, hidden_size=args.hidden,
                     intermediate_size=args.intermediate, num_heads=args.heads,
                     num_kv_heads=args.kv_heads, n_system=args.tokens[0], n_vision=args.tokens[1],
                     n_instruction=args.tokens[2], device=args.device, dtype=getattr(torch, args.dtype))
    print(f"device={args.device} threads={torch.get_num_threads()} layers={args.layers} d={args.hidden} "
          f"m={args.intermediate} tokens={sum(args.tokens)}")
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
