#!/usr/bin/env bash
# Install, then run the example: a tiny Llama learns two experts, saves them, and routes between them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
python examples/quickstart.py "$@"
