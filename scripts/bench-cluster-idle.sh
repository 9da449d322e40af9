#!/usr/bin/env bash
# Cluster-mode idle connections (issue 15): one Redis and three nodes on this machine,
# CONNS WebSockets (default 57,000: 19,000 per node) spread over the three nodes by
# three load-generator processes; prints the nodes' memory per connection (from
# `tether bench idle`) and Redis's (INFO memory used_memory, before and with every
# connection open).
#
#   CONNS=57000 bash scripts/bench-cluster-idle.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=target/release/tether; W=$(mktemp -d); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$W"' EXIT
redis-server --port 6392 --bind 127.0.0.1 --save "" --appendonly no --dir $W >/dev/null 2>&1 & PIDS+=($!)
sleep 0.5
for i in 1 2 3; do
  TETHER_BROKER__KIND=redis TETHER_BROKER__URL=redis://127.0.0.1:6392 TETHER_LOG__LEVEL=warn TETHER_SHUTDOWN__PRE_DRAIN_MS=0 \
    $BIN serve --node-id idle-$i --listen 127.0.0.1:186${i}0 --api-listen 127.0.0.1:186${i}1 >$W/n$i.log 2>&1 & PIDS+=($!)
done
for i in 1 2 3; do for _ in $(seq 100); do curl -fsS http://127.0.0.1:186${i}1/readyz >/dev/null 2>&1 && break; sleep 0.1; done; done
NODEPIDS="${PIDS[1]},${PIDS[2]},${PIDS[3]}"
before=$(redis-cli -p 6392 info memory | grep '^used_memory:' | cut -d: -f2 | tr -d '\r')
$BIN bench idle --target tether --url ws://127.0.0.1:18610/ws,ws://127.0.0.1:18620/ws,ws://127.0.0.1:18630/ws \
  --procs 3 --sources 127.0.0.1,127.0.0.2,127.0.0.3 --pid $NODEPIDS --connections ${CONNS:-57000} --hold-secs 15 --timeout-secs 240 > $W/idle.json 2>$W/idle.err &
BP=$!
CONNS=${CONNS:-57000}
for _ in $(seq 240); do
  n=0; for i in 1 2 3; do c=$(curl -s http://127.0.0.1:186${i}1/api/stats | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["connections"]["ws"])' 2>/dev/null || echo 0); n=$((n+c)); done
  [ "$n" -ge "$CONNS" ] && break; sleep 1
done
echo "open: $n"
after=$(redis-cli -p 6392 info memory | grep '^used_memory:' | cut -d: -f2 | tr -d '\r')
keys=$(redis-cli -p 6392 dbsize)
wait $BP || true
echo "redis used_memory before=$before after=$after keys=$keys"
tail -1 $W/idle.json; tail -3 $W/idle.err
for i in 1 2 3; do curl -s http://127.0.0.1:186${i}1/api/stats; echo; done
