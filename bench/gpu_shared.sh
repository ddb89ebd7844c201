#!/usr/bin/env bash
# One device call for shared leases (issue 11): many sessions on the direct path at once.
# Contention with shared leases (the default) against one lease at a time (bench/configs/noshared.toml)
# and the baselines, fair share on the GPU, the latency of one tenant, then the GPU suite.
# Every log lands under $OUT; a summary goes to stdout. Knobs: TENANTS (1,4,16,64), BASE_TENANTS
# (1,4,16), SECONDS_PER_POINT (1.0), GPU_TESTS (1).
set -u
export PYTHONUNBUFFERED=1
nvidia-smi -L > "$OUT/smi.txt"; nvidia-smi --query-gpu=driver_version --format=csv,noheader >> "$OUT/smi.txt"; date -u >> "$OUT/smi.txt"
cat "$OUT/smi.txt"
sec=${SECONDS_PER_POINT:-1.0}
contention() {  # name, then bench.contention arguments
  local name=$1; shift
  timeout 240 python3 -m bench.contention --device cuda --workload null,mlp:32:4 --seconds "$sec" --warmup 0.5 \
    --json --out "$OUT/$name.json" "$@" > /dev/null 2> "$OUT/$name.err"; tail -2 "$OUT/$name.err"
  python3 -m bench.contention --from-json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
  echo "== $name"; cat "$OUT/$name.txt"
}
contention shared --modes kaas --tenants "${TENANTS:-1,4,16,64}" --trace
contention noshared --modes kaas --tenants 4,16 --config bench/configs/noshared.toml
contention baselines --modes own-context,mps --tenants "${BASE_TENANTS:-1,4,16}"
timeout 60 python3 -m tools.bench fairness --device cuda --seconds 10 --weights 1,2 --inflight 16 --json \
  > "$OUT/fair.json" 2> "$OUT/fair.err"; echo "== fairness"; cat "$OUT/fair.json" | head -40
timeout 60 python3 -m tools.bench latency --device cuda --iterations 5000 --trace > "$OUT/lat.txt" 2>&1
echo "== latency"; head -16 "$OUT/lat.txt"
if [ "${GPU_TESTS:-1}" = 1 ]; then
  timeout 300 make gpu SYSTEM_PYTHON=1 > "$OUT/gpu_tests.log" 2>&1; echo "make gpu: exit $?"; tail -2 "$OUT/gpu_tests.log"
fi
