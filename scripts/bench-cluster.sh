#!/usr/bin/env bash
# Cluster-mode benchmarks (issue 15), on this one machine: fan-out through 1, 2 and 3
# nodes sharing one Redis, against one node on the in-memory broker, in two shapes:
# a burst (back-to-back publishes: deliveries/s, server CPU per delivery) and a paced
# run (publish -> deliver latency: what Redis adds over the in-memory broker).
# The nodes, Redis and the load generator share the machine's cores: read the
# scaling with that in mind.
#
#   bash scripts/bench-cluster.sh                 # prints one JSON object per run
#   SUBSCRIBERS=6000 MESSAGES=200 bash scripts/bench-cluster.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="${TETHER_BIN:-$ROOT/target/release/tether}"
SUBSCRIBERS="${SUBSCRIBERS:-6000}"
MESSAGES="${MESSAGES:-100}"
PACED_MESSAGES="${PACED_MESSAGES:-100}"
RATE="${RATE:-20}"
REDIS_PORT="${REDIS_PORT:-6391}"
NODES="${NODES:-memory 1 2 3}"
[ -x "$BIN" ] || cargo build --release -p tether
WORK="$(mktemp -d)"
PIDS=()

cleanup() {
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] || continue
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
}
trap 'cleanup; rm -rf "$WORK"' EXIT

start_redis() {
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$WORK" >/dev/null 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return; sleep 0.1; done
    echo "redis did not start" >&2; exit 1
}

# start_node I KIND: node I on ports 187I0 (clients) / 187I1 (API).
start_node() {
    local i="$1" kind="$2"
    local env=(TETHER_SHUTDOWN__PRE_DRAIN_MS=0 TETHER_LOG__LEVEL=warn)
    if [ "$kind" = redis ]; then
        env+=(TETHER_BROKER__KIND=redis "TETHER_BROKER__URL=redis://127.0.0.1:$REDIS_PORT")
    fi
    env "${env[@]}" "$BIN" serve --node-id "bench-$i" --listen "127.0.0.1:187${i}0" \
        --api-listen "127.0.0.1:187${i}1" >"$WORK/node-$i.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do curl -fsS "http://127.0.0.1:187${i}1/readyz" >/dev/null 2>&1 && return; sleep 0.1; done
    echo "node $i did not become ready" >&2; exit 1
}

# run SETUP: SETUP is "memory" (one node, in-memory broker) or a node count on Redis.
run() {
    local setup="$1" n urls="" pids=""
    if [ "$setup" = memory ]; then
        n=1; start_node 1 memory
    else
        n="$setup"; start_redis
        for i in $(seq "$n"); do start_node "$i" redis; done
    fi
    for i in $(seq "$n"); do
        urls="${urls:+$urls,}ws://127.0.0.1:187${i}0/ws"
    done
    pids="$(printf '%s,' "${PIDS[@]}")"; pids="${pids%,}"
    local procs=$(( n < 2 ? 2 : n ))
    for shape in burst paced; do
        local extra=(--messages "$MESSAGES" --rate 0 --publishers 1)
        [ "$shape" = paced ] && extra=(--messages "$PACED_MESSAGES" --rate "$RATE")
        local out
        out="$("$BIN" bench fanout --url "$urls" --api http://127.0.0.1:18711 \
            --subscribers "$SUBSCRIBERS" --procs "$procs" --pid "$pids" \
            --channel bench --bytes 100 "${extra[@]}" 2>/dev/null | tail -n 1)"
        echo "{\"setup\":\"$setup\",\"shape\":\"$shape\",\"nodes\":$n,\"result\":$out}"
    done
    cleanup
    sleep 1
}

for setup in $NODES; do run "$setup"; done
