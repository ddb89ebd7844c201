#!/usr/bin/env bash
# The 10-minute soak on a lent GPU, over two device calls (one call may run 10 minutes at most):
#
#   bench/gpu_soak.sh start    # wheels, then the soak in its own session (setsid), then waits WAIT s
#   bench/gpu_soak.sh finish   # waits for it to end, then puts the table, JSON, plot and log in $OUT
#
# Make the second call at once after the first (a machine idle for 30 s is given back). The soak
# runs from a copy of the tree in /tmp/soakrepo, so the second call's fresh copy cannot change it.
# Knobs: TENANTS (64), SECONDS_ (600), CHAOS (3), SEED (7), WAIT (480), DEVICE (cuda).
set -u
export PYTHONUNBUFFERED=1
D=/tmp/soak
case "${1:-}" in
start)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
    rm -rf /tmp/soakrepo "$D" && cp -r . /tmp/soakrepo && mkdir -p "$D"
    cd /tmp/soakrepo || exit 1
    export PYTHONPATH=/tmp/site:/tmp/soakrepo
    nvidia-smi -L 2>/dev/null
    # The soak writes its own pid (whatever setsid does about forking), and outlives this call.
    setsid nohup sh -c 'echo $$ > "$0/pid"; exec python3 -m tools.bench soak --device "$5" --tenants "$1" \
        --seconds "$2" --warmup 10 --chaos-every "$3" --seed "$4" --broker-log "$0/broker.log" --json' \
        "$D" "${TENANTS:-64}" "${SECONDS_:-600}" "${CHAOS:-3}" "${SEED:-7}" "${DEVICE:-cuda}" > "$D/soak.json" 2> "$D/soak.err" < /dev/null &
    sleep 1
    echo "soak started, pid $(cat "$D/pid")"
    sleep "${WAIT:-480}"
    tail -3 "$D/soak.err"
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv 2>/dev/null
    ;;
finish)
    cd /tmp/soakrepo || exit 1
    export PYTHONPATH=/tmp/site:/tmp/soakrepo
    pid=$(cat "$D/pid")
    for _ in $(seq 1 110); do kill -0 "$pid" 2>/dev/null || break; sleep 5; done  # the pid, never a pattern
    kill -0 "$pid" 2>/dev/null && echo "the soak is still running (pid $pid)"
    cp "$D/soak.json" "$D/soak.err" "$OUT/"
    gzip -c "$D/broker.log" > "$OUT/broker.log.gz"
    python3 -m tools.bench soak --from-json "$D/soak.json" > "$OUT/soak.txt" 2>&1
    cat "$OUT/soak.txt"
    python3 -m tools.bench soak --from-json "$D/soak.json" --plot "$OUT/soak.png" > /dev/null || true
    ;;
*)
    echo "usage: bench/gpu_soak.sh start|finish" >&2
    exit 2
    ;;
esac
