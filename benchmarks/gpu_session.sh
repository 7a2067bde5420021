#!/usr/bin/env bash
# The GPU checks of one session, as one script (the device tool runs it on a lent GPU; figures go to $OUT, or
# benchmarks/results/gpu without it). Correctness first (every Triton kernel compiled, fp32/fp16/bf16), then the
# fused decode kernel against the unfused chain, then a 7B model's layer sizes. Each step is bounded, so one
# slow step cannot take the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
for check in route fused fused_shapes sorted dense model compiled opcheck; do
  KERNEL_DEVICE=cuda timeout 240 $PY tests/kernel_checks.py $check 30 2>&1 | tail -3 | sed "s/^/[$check] /" \
    | tee -a "$OUT/checks.txt"
done
timeout 240 $PY benchmarks/kernel_profile.py --tokens 1 8 16 512 4096 --sizes 8 64 256 \
  --out "$OUT/kernel_profile.json" 2>&1 | tee "$OUT/kernel_profile.txt" | grep -v '^    '
timeout 240 $PY benchmarks/kernel_profile.py --tokens 1 16 4096 --sizes 64 --d-in 4096 --d-out 14336 \
  --out "$OUT/kernel_profile_7b_mlp.json" 2>&1 | tee "$OUT/kernel_profile_7b_mlp.txt" | grep -v '^    '
timeout 420 $PY benchmarks/routing_speed.py --device cuda --dtype bfloat16 --parts whole,decode --hidden 4096 \
  --intermediate 14336 --tokens 4096 --sizes 8,64 --reps 3 --out "$OUT/routing_speed_7b.json" 2>&1 \
  | tee "$OUT/routing_speed_7b.txt" | tail -30
