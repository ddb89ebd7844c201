#!/usr/bin/env bash
# Device call 1: every mode at tiny sizes (pytest, incl. the gpu test), then a short null sweep and
# one or few tenants of the big workloads to size the real sweep. Logs under $OUT.
set -u
R=bench/runs/2026-11-24-h100-contention
{ which nvidia-cuda-mps-control; nvidia-smi -L; nvidia-smi --query-gpu=driver_version,compute_mode --format=csv,noheader; nproc; free -g | head -2; python3 -c "import cuda.bindings, numpy, matplotlib; print(cuda.bindings.__version__, numpy.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 240 python3 -m pytest -q tests/test_contention.py tests/test_kernels.py > "$OUT/pytest.txt" 2>&1; tail -6 "$OUT/pytest.txt"
timeout 150 python3 -m bench.contention --tenants 1,4,16,64 --workload null --seconds 1 --warmup 0.3 --trace --json \
  > "$OUT/smoke_null.json" 2> "$OUT/smoke_null.err"; grep -v "^\s*$" "$OUT/smoke_null.err" | tail -20
timeout 150 python3 -m bench.contention --tenants 1,4 --workload sgemm:4096,mlp,jacobi:1024:16 --seconds 1.5 --warmup 0.5 \
  --trace --json > "$OUT/smoke_big.json" 2> "$OUT/smoke_big.err"; tail -26 "$OUT/smoke_big.err"
