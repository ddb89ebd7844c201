#!/usr/bin/env bash
# One device call: where a null graph's time goes on the direct path (issue 11): the in-process
# backend breakdown (bench/backend_path.py), cProfile of tenant, broker and worker
# (bench/profile_hotpath.py), and the traced latency. Logs land under $OUT; a summary goes to stdout.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi -L > "$OUT/smi.txt"; date -u >> "$OUT/smi.txt"; cat "$OUT/smi.txt"
timeout 120 python3 -m bench.backend_path --iterations 5000 --profile > "$OUT/backend_path.json" 2>&1
head -40 "$OUT/backend_path.json"
timeout 120 python3 -m bench.profile_hotpath --device cuda --iterations 5000 --top 40 > "$OUT/profile.txt" 2>&1
cat "$OUT/profile.txt"
timeout 90 python3 -m tools.bench latency --device cuda --iterations 5000 --trace > "$OUT/lat.txt" 2>&1; head -16 "$OUT/lat.txt"
