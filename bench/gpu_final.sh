#!/usr/bin/env bash
# Final device check: broker-level GPU tests, traced latency, GPU fairness. Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi -L > "$OUT/smi.txt"; date -u >> "$OUT/smi.txt"
timeout 200 python3 -m pytest -m gpu -q tests/gpu/test_broker_gpu.py tests/gpu/test_faults_gpu.py > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
timeout 90 python3 -m tools.bench latency --device cuda --iterations 3000 --trace > "$OUT/lat.txt" 2>&1; head -16 "$OUT/lat.txt"
timeout 60 python3 -m tools.bench fairness --device cuda --seconds 10 --weights 1,2 --json --plot "$OUT/fair-gpu-1,2.png" > "$OUT/fair-gpu-1,2.json" 2>&1; tail -30 "$OUT/fair-gpu-1,2.json" | grep -E '"(tenant|weight|target_share|share|graphs)"'
