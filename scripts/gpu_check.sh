#!/usr/bin/env bash
# The one-command GPU check (at most 8 minutes on one GPU; logic in scripts/gpu_check.py):
# prefill latency vs FLOPs cut of DOP policies and every baseline on a 7B-shaped model in fp16 (SDPA,
# and FlashAttention-2 where flash_attn is installed), identity overhead, peak memory, one sweep
# point's time. Without CUDA it runs the same code on a small shape on the CPU and says so.
#
#   scripts/gpu_check.sh                      # auto: cuda + 7B shape, else cpu + small shape
#   scripts/gpu_check.sh --json out.json      # also write the rows (other options: --help)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PYTHON" scripts/gpu_check.py "$@"
