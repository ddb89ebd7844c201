#!/usr/bin/env bash
# One device call: GPU tests, latency (spin off/on, traced), 4 tenants, bandwidth, demo. Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi -L > "$OUT/smi.txt"; nvidia-smi --query-gpu=driver_version --format=csv,noheader >> "$OUT/smi.txt"; date -u >> "$OUT/smi.txt"
python3 -m pytest -m gpu -q tests/gpu > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
python3 -m tools.bench latency --device cuda --iterations 5000 --trace --config bench/configs/nospin.toml > "$OUT/lat_nospin.txt" 2>&1
python3 -m tools.bench latency --device cuda --iterations 5000 --trace --plot "$OUT/lat_hist.png" > "$OUT/lat_spin.txt" 2>&1
head -16 "$OUT/lat_nospin.txt"; head -16 "$OUT/lat_spin.txt"
python3 -m tools.bench latency --device cuda --iterations 2000 --tenants 4 --json > "$OUT/lat4.json" 2>"$OUT/lat4.err"
python3 -c "import json;d=json.load(open('$OUT/lat4.json'));print('4 tenants', {k: round(v,1) for k,v in d['kaas'].items()})"
python3 -m tools.bench bandwidth --device cuda > "$OUT/bw.txt" 2>&1; tail -4 "$OUT/bw.txt"
python3 -m tools.demo --device auto --graphs 50 2>&1 | tail -7 > "$OUT/demo.txt"; cat "$OUT/demo.txt"
