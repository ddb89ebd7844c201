#!/usr/bin/env bash
# One device call for the direct path (issue 11): the GPU suite, then the same measurements with the
# direct path on (the default) and off (bench/configs/nodirect.toml), side by side in one call.
# Every log lands under $OUT; a summary goes to stdout. Knobs: GPU_TESTS (1), NODIRECT (1: also measure
# with the direct path off), TENANTS (1,4,16), SECONDS_PER_POINT (1.5).
set -u
export PYTHONUNBUFFERED=1
nvidia-smi -L > "$OUT/smi.txt"; nvidia-smi --query-gpu=driver_version --format=csv,noheader >> "$OUT/smi.txt"; date -u >> "$OUT/smi.txt"
cat "$OUT/smi.txt"
if [ "${GPU_TESTS:-1}" = 1 ]; then
  timeout 240 make gpu SYSTEM_PYTHON=1 > "$OUT/gpu_tests.log" 2>&1; echo "make gpu: exit $?"; tail -2 "$OUT/gpu_tests.log"
fi
modes="direct nodirect direct"; [ "${NODIRECT:-1}" = 1 ] || modes="direct direct"
i=0
for mode in $modes; do
  i=$((i + 1))
  cfg=(); [ "$mode" = nodirect ] && cfg=(--config bench/configs/nodirect.toml)
  timeout 90 python3 -m tools.bench latency --device cuda --iterations 5000 --trace "${cfg[@]}" > "$OUT/lat-$i-$mode.txt" 2>&1
  echo "== latency, $mode"; head -16 "$OUT/lat-$i-$mode.txt"
done
timeout 200 python3 -m bench.contention --device cuda --modes kaas,own-context,mps --workload null,mlp:32:4 \
  --tenants "${TENANTS:-1,4,16}" --seconds "${SECONDS_PER_POINT:-1.5}" --warmup 0.5 --json --out "$OUT/contention.json" \
  > /dev/null 2> "$OUT/contention.err"; tail -3 "$OUT/contention.err"
python3 -m bench.contention --from-json "$OUT/contention.json" > "$OUT/contention.txt" 2>&1; cat "$OUT/contention.txt"
[ "${NODIRECT:-1}" = 1 ] || exit 0
timeout 60 python3 -m bench.contention --device cuda --modes kaas --workload null,mlp:32:4 --tenants 1 \
  --config bench/configs/nodirect.toml --seconds 1.5 --warmup 0.5 --json --out "$OUT/contention-nodirect.json" \
  > /dev/null 2> "$OUT/contention-nodirect.err"
python3 -m bench.contention --from-json "$OUT/contention-nodirect.json" > "$OUT/contention-nodirect.txt" 2>&1
echo "== kaas without the direct path"; cat "$OUT/contention-nodirect.txt"
