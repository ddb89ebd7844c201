#!/usr/bin/env bash
# One device call (session 21): the GPU suite, the direct path's latency after the worker and tenant
# trims, and contention at 1/4/16 tenants against own-context and MPS.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L > "$OUT/smi.txt"; date -u >> "$OUT/smi.txt"; cat "$OUT/smi.txt"
timeout 240 make gpu SYSTEM_PYTHON=1 > "$OUT/gpu_tests.log" 2>&1; echo "make gpu: exit $?"; tail -2 "$OUT/gpu_tests.log"
for i in 1 2; do
  timeout 90 python3 -m tools.bench latency --device cuda --iterations 5000 --trace > "$OUT/lat-$i.txt" 2>&1; head -15 "$OUT/lat-$i.txt"
done
timeout 150 python3 -m bench.contention --device cuda --modes kaas,own-context,mps --workload null,mlp:32:4 \
  --tenants 1,4,16 --seconds 1.0 --warmup 0.5 --json --out "$OUT/contention.json" > /dev/null 2> "$OUT/contention.err"
python3 -m bench.contention --from-json "$OUT/contention.json" > "$OUT/contention.txt" 2>&1; cat "$OUT/contention.txt"
