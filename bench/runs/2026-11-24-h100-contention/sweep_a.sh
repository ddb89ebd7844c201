#!/usr/bin/env bash
# Device call 2: null and sgemm:1024, every mode, 1..64 tenants (mps stops at its 48-client limit,
# exclusive is trimmed at 8: each of its points spans two rounds of ~1 s cold starts per tenant).
set -u
timeout 500 python3 -m bench.contention --tenants 1,2,4,8,16,32,64 --workload null,sgemm:1024 --seconds 2 --warmup 0.5 \
  --trace --max-tenants exclusive=8 --out "$OUT/sweep_a.json" --json > /dev/null 2> "$OUT/sweep_a.err"
tail -3 "$OUT/sweep_a.err"
python3 -m bench.contention --from-json "$OUT/sweep_a.json" --plot "$OUT/contention" > "$OUT/sweep_a.txt" 2>&1; cat "$OUT/sweep_a.txt"
