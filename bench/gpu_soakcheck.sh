set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
nproc
for v in default blas1 blas1spin0; do
  case $v in default) e=();; blas1) e=(OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1);; blas1spin0) e=(OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 KAAS_SPIN_US=0);; esac
  env "${e[@]}" timeout 150 python3 -m tools.bench soak --device cuda --tenants 64 --seconds 30 --warmup 8 --chaos-every 100000 --seed 7 --json > "$OUT/soak-$v.json" 2> "$OUT/soak-$v.err"
  echo "== $v rc $?"
  python3 - "$OUT/soak-$v.json" <<'PY'
import json,sys
d=json.load(open(sys.argv[1]))
th=d['throughput']; g=[r['graphs'] for r in th[10:]]
print("graphs/s mean", sum(g)/max(1,len(g)), "max", max(g, default=0))
t=d['tenants']; import statistics
print("p99 calm ms median over tenants", statistics.median([x['p99_ms_calm'] or 0 for x in t]))
print("broker", d.get('broker_stats',{}).get('graphs'), "problems", d['problems'][:3])
PY
done
