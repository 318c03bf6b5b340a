#!/usr/bin/env bash
# Create .venv and install dop in the order that works on a CPU machine (see README "Install"):
# torch's CPU wheel first, then dop and its extras, then lmms-eval without its pins.
# Idempotent: a stamp keyed on pyproject.toml skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${DOP_VENV:-.venv}
TORCH_SPEC=${DOP_TORCH_SPEC:-torch==2.13.0}
LMMS_EVAL_SPEC=${DOP_LMMS_EVAL_SPEC:-lmms-eval==0.7.3}
STAMP="$VENV/.dop-setup-$(sha256sum pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null 2>&1 || true
echo "[setup] $TORCH_SPEC (CPU wheel first; never CUDA, never torchvision)"
$PIP install "$TORCH_SPEC"
echo "[setup] dop with extras eval, slurm, dev"
$PIP install -e ".[eval,slurm,dev]"
echo "[setup] $LMMS_EVAL_SPEC --no-deps"
$PIP install --no-deps "$LMMS_EVAL_SPEC"
if $VENV/bin/python -c "import torchvision" 2>/dev/null; then
  echo "[setup] removing torchvision (breaks beside this torch and breaks lmms-eval's import)"
  $PIP uninstall -y torchvision
fi
rm -f "$VENV"/.dop-setup-*
touch "$STAMP"
echo "[setup] done: $($VENV/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
