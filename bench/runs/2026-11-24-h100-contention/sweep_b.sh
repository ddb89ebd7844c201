#!/usr/bin/env bash
# Device call 3: sgemm:4096 (1..16 tenants, 3 s windows; exclusive to 4), then mlp:32:4 and jacobi:1024:16
# (1..64 tenants, 1.5 s windows; mps to its 48-client limit, exclusive to 8).
set -u
timeout 170 python3 -m bench.contention --tenants 1,2,4,8,16 --workload sgemm:4096 --seconds 3 --warmup 0.5 \
  --trace --max-tenants exclusive=4 --out "$OUT/sweep_b1.json" --json > /dev/null 2> "$OUT/sweep_b.err"
timeout 350 python3 -m bench.contention --tenants 1,2,4,8,16,32,64 --workload mlp:32:4,jacobi:1024:16 --seconds 1.5 \
  --warmup 0.5 --trace --max-tenants exclusive=8 --out "$OUT/sweep_b2.json" --json > /dev/null 2>> "$OUT/sweep_b.err"
grep -v "^\s*$" "$OUT/sweep_b.err" | tail -4
for f in b1 b2; do python3 -m bench.contention --from-json "$OUT/sweep_$f.json" --plot "$OUT/contention" > "$OUT/sweep_$f.txt" 2>&1; cat "$OUT/sweep_$f.txt"; done
