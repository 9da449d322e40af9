#!/usr/bin/env bash
# Connection churn in cluster mode (issue 15): connect + subscribe + close cycles per
# second through one node on the in-memory broker and one node on one Redis, ROUNDS
# times each, and what each cycle costs Redis (INFO commandstats) and leaves in it
# (DBSIZE: release receipts are deleted once acted on, so nothing should stay).
# Redis, the node and the load generator share this machine's cores.
#
#   bash scripts/bench-cluster-churn.sh            # WORKERS=64 SECS=10 ROUNDS=2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${TETHER_BIN:-$ROOT/target/release/tether}"
WORKERS="${WORKERS:-64}"
SECS="${SECS:-10}"
ROUNDS="${ROUNDS:-2}"
REDIS_PORT="${REDIS_PORT:-6392}"
[ -x "$BIN" ] || cargo build --release -p tether
NODE=""
cleanup() {
    [ -n "$NODE" ] && kill -9 "$NODE" 2>/dev/null || true
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
}
trap cleanup EXIT
redis-server --port "$REDIS_PORT" --save '' --appendonly no --daemonize yes \
    --logfile /dev/null >/dev/null
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

# run LABEL [ENV=VALUE ...]: one node, one churn run, Redis's cost per cycle.
run() {
    local label=$1
    shift
    env "$@" TETHER_LOG__LEVEL=warn "$BIN" serve --listen 127.0.0.1:18700 \
        --api-listen 127.0.0.1:18701 >/dev/null 2>&1 &
    NODE=$!
    for _ in $(seq 100); do curl -sf http://127.0.0.1:18701/readyz >/dev/null && break; sleep 0.1; done
    redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
    local out
    out=$("$BIN" bench churn --target tether --url ws://127.0.0.1:18700/ws \
        --api http://127.0.0.1:18701 --workers "$WORKERS" --secs "$SECS" | tail -1)
    kill -TERM "$NODE"
    wait "$NODE" 2>/dev/null || true
    NODE=""
    local usec keys
    usec=$(redis-cli -p "$REDIS_PORT" info commandstats \
        | python3 -c "import re, sys; print(sum(int(u) for u in re.findall(r',usec=(\d+),', sys.stdin.read())))")
    keys=$(redis-cli -p "$REDIS_PORT" dbsize)
    echo "$out" | python3 -c "
import json, sys
r = json.load(sys.stdin)
c = r['cycles']
print(json.dumps({'setup': '$label', 'cycles_per_sec': round(r['cycles_per_sec']),
    'cycle_ms_p50': r['cycle_ms_p50'], 'cycle_ms_p99': r['cycle_ms_p99'],
    'failed': r['failed'], 'registry_back_to_zero': r['registry_back_to_zero'],
    'redis_usec_per_cycle': round($usec / c, 1) if '$label' != 'memory' else None,
    'redis_keys_after': $keys}))"
}
for _ in $(seq "$ROUNDS"); do
    run memory
    run redis TETHER_BROKER__KIND=redis "TETHER_BROKER__URL=redis://127.0.0.1:$REDIS_PORT"
done
