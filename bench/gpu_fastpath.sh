#!/usr/bin/env bash
# One device call for the fast-path issue: the GPU suite, traced latency, contention against own-context
# and MPS, GPU fairness. Every log lands under $OUT; a summary goes to stdout.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi -L > "$OUT/smi.txt"; nvidia-smi --query-gpu=driver_version --format=csv,noheader >> "$OUT/smi.txt"; date -u >> "$OUT/smi.txt"
timeout 200 make gpu SYSTEM_PYTHON=1 > "$OUT/gpu_tests.log" 2>&1; echo "make gpu: exit $?"; tail -2 "$OUT/gpu_tests.log"
timeout 90 python3 -m tools.bench latency --device cuda --iterations 5000 --trace > "$OUT/lat.txt" 2>&1; head -19 "$OUT/lat.txt"
timeout 240 python3 -m bench.contention --device cuda --modes kaas,own-context,mps --workload null,mlp:32:4 \
  --tenants "${TENANTS:-1,4,16,32,64}" --seconds "${SECONDS_PER_POINT:-1.5}" --warmup 0.5 --json --out "$OUT/contention.json" \
  > /dev/null 2> "$OUT/contention.err"; tail -4 "$OUT/contention.err"
python3 -m bench.contention --from-json "$OUT/contention.json" > "$OUT/contention.txt" 2>&1; cat "$OUT/contention.txt"
timeout 60 python3 -m tools.bench fairness --device cuda --seconds 10 --weights 1,2 --inflight 16 --json > "$OUT/fair.json" 2>&1
grep -E '"(tenant|weight|target_share|share)"' "$OUT/fair.json" | tr -d ' \n'; echo
