#!/usr/bin/env bash
# The Rust SDK's memory stays flat: `tether connect` stays subscribed while N messages
# (default 100000) pass, and its RSS is sampled from /proc every second.
#
#   bash scripts/sdk-rss.sh [BIN] [N]     # BIN defaults to target/debug/tether
#
# Loopback only: a server on 127.0.0.1:17800/17801, `tether bench fanout` (one extra
# subscriber) as the publisher. Prints the RSS samples (KiB) and the client's stats line.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:-$ROOT/target/debug/tether}"
N="${2:-100000}"
OUT="$(mktemp -d)"
CLIENT=
"$BIN" serve --listen 127.0.0.1:17800 --api-listen 127.0.0.1:17801 2>"$OUT/server.log" &
SERVER=$!
trap 'kill $SERVER $CLIENT 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:17801/readyz >/dev/null && break; sleep 0.1; done
"$BIN" connect ws://127.0.0.1:17800/ws --client rss --channel load --stats >"$OUT/lines" &
CLIENT=$!
sleep 1
rss() { awk '/VmRSS/ {print $2}' "/proc/$CLIENT/status"; }
echo "before: $(rss) KiB"
"$BIN" bench fanout --subscribers 1 --messages "$N" --publishers 4 --channel load \
    --url ws://127.0.0.1:17800/ws --api http://127.0.0.1:17801 >"$OUT/bench.txt" 2>&1 &
BENCH=$!
SAMPLES=()
while kill -0 "$BENCH" 2>/dev/null; do
    SAMPLES+=("$(rss)")
    sleep 1
done
wait "$BENCH"
echo "during (1/s): ${SAMPLES[*]}"
echo "after: $(rss) KiB"
kill -INT "$CLIENT"
wait "$CLIENT" || true
CLIENT=
echo "messages delivered: $(grep -c '"event":"message"' "$OUT/lines")"
tail -n1 "$OUT/lines"
