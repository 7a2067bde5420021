#!/usr/bin/env bash
# Install peft-routing with its dev tools into ./.venv (idempotent).
# torch: an existing install is kept (GPU users keep their CUDA build). With none, we ask pip for torch==2.13.0,
# which on our CPU-only machines resolves to the local CPU build; set TORCH_SPEC to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev]"
python -c "import torch, peft, peft_routing; print(f'installed: torch {torch.__version__}, peft {peft.__version__}, peft_routing {peft_routing.__version__}')"
