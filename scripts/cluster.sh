#!/usr/bin/env bash
# A local cluster to look at: one Redis and three Tether nodes on this machine, all
# stopped on Ctrl-C (or when any of them exits).
#
#   bash scripts/cluster.sh            # builds target/release/tether if needed
#
# Nodes: clients on 127.0.0.1:7710, :7720, :7730; their APIs on :7711, :7721, :7731.
# Redis on 127.0.0.1:6390 (persistence off). Try:
#   curl -s localhost:7711/api/stats
#   target/release/tether connect ws://127.0.0.1:7720/ws --client alice --channel news
#   target/release/tether publish --api http://127.0.0.1:7731 --channel news '"hi"'
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

REDIS_PORT="${REDIS_PORT:-6390}"
BIN="${TETHER_BIN:-$ROOT/target/release/tether}"
WORK="$(mktemp -d)"
PIDS=()

stop_all() {
    trap - INT TERM EXIT
    echo
    echo "stopping: ${PIDS[*]:-}"
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap stop_all INT TERM EXIT

command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server" >&2; exit 1; }
[ -x "$BIN" ] || cargo build --release -p tether

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

for i in 1 2 3; do
    TETHER_BROKER__KIND=redis TETHER_BROKER__URL="redis://127.0.0.1:$REDIS_PORT" \
        TETHER_SHUTDOWN__PRE_DRAIN_MS=0 TETHER_SHUTDOWN__DRAIN_WINDOW_MS=1000 \
        "$BIN" serve --node-id "tether-$i" --listen "127.0.0.1:77${i}0" \
        --api-listen "127.0.0.1:77${i}1" >"$WORK/node-$i.log" 2>&1 &
    PIDS+=($!)
done

for i in 1 2 3; do
    for _ in $(seq 100); do
        curl -fsS "http://127.0.0.1:77${i}1/healthz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    echo "tether-$i: clients ws://127.0.0.1:77${i}0/ws, api http://127.0.0.1:77${i}1 (log $WORK/node-$i.log)"
done
echo "redis: 127.0.0.1:$REDIS_PORT. Ctrl-C stops everything."
# Returns when any of them exits (or on Ctrl-C); the trap stops the rest.
wait -n "${PIDS[@]}"
