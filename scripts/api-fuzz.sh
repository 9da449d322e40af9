#!/usr/bin/env bash
# Fuzzes the server API with Schemathesis against the API's own OpenAPI document
# (GET /api/openapi.json): a real `tether serve` (key-less, loopback, free ports),
# property-based requests (valid and invalid) for every documented operation but
# the endless /api/events stream and the /admin dashboard, and these checks on
# every answer (/admin/session is fuzzed: with no key it must answer `no_key`):
#   not_a_server_error            no 5xx
#   status_code_conformance       the status is documented for the operation
#   content_type_conformance      the Content-Type is documented for that status
#   response_schema_conformance   the body matches the documented schema
#
#   bash scripts/api-fuzz.sh
#
# Not part of CI's critical path. Idempotent: reuses .venv-fuzz (reinstalling when
# tests/schemathesis/requirements.txt changes) and cleans up the server it starts.
# Knobs (environment): FUZZ_MAX_EXAMPLES (per operation, default 50),
# FUZZ_TIME_LIMIT (seconds for the whole Schemathesis run, default 300),
# FUZZ_SEED (reproduce a run), TETHER_BIN (skip `cargo build`, use this binary).
# Reports (JUnit, server log) land in target/api-fuzz/. Exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv-fuzz"
REQS="$ROOT/tests/schemathesis/requirements.txt"
OUT="$ROOT/target/api-fuzz"
MAX_EXAMPLES="${FUZZ_MAX_EXAMPLES:-50}"
TIME_LIMIT="${FUZZ_TIME_LIMIT:-300}"
CHECKS="not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"

log() { printf 'api-fuzz: %s\n' "$*" >&2; }

# 1. The fuzzer, in its own venv, at the pinned version.
stamp="$VENV/.requirements.sha256"
want="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/schemathesis" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing $(grep -v '^#' "$REQS" | tr '\n' ' ')into $VENV"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
    echo "$want" >"$stamp"
fi
PY="$VENV/bin/python"

# 2. The server binary.
if [ -n "${TETHER_BIN:-}" ]; then
    BIN="$TETHER_BIN"
else
    log "cargo build -p tether"
    cargo build --quiet -p tether
    BIN="$ROOT/target/debug/tether"
fi
[ -x "$BIN" ] || { log "no executable tether binary at $BIN"; exit 2; }

# 3. A key-less server on free loopback ports, isolated from any TETHER_* variable.
mkdir -p "$OUT"
read -r CLIENT_PORT API_PORT < <("$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
EOF
)
BASE="http://127.0.0.1:$API_PORT"
SERVER_LOG="$OUT/server.log"
unset_tether=()
while IFS= read -r name; do unset_tether+=(-u "$name"); done < <(compgen -e | grep '^TETHER_' || true)
env "${unset_tether[@]}" RUST_LOG=info "$BIN" serve \
    --listen "127.0.0.1:$CLIENT_PORT" --api-listen "127.0.0.1:$API_PORT" --node-id fuzz \
    >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
cleanup() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || true
}
trap cleanup EXIT

if ! "$PY" - "$BASE" <<'EOF'; then
import sys, time, urllib.request
base = sys.argv[1]
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=1) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(1)
EOF
    log "the server did not come up on $BASE; its log:"
    cat "$SERVER_LOG" >&2
    exit 2
fi
log "tether serve up on $BASE (pid $SERVER_PID); fuzzing $BASE/api/openapi.json"

# 4. The fuzz run, bounded per operation and in time.
JUNIT="$OUT/junit.xml"
rm -f "$JUNIT"
seed=()
[ -n "${FUZZ_SEED:-}" ] && seed=(--seed "$FUZZ_SEED")
set +e
# From $OUT, so Schemathesis' and Hypothesis' caches (.schemathesis/, .hypothesis/,
# which replay earlier failures first) stay out of the work tree.
(cd "$OUT" && timeout "$TIME_LIMIT" "$VENV/bin/schemathesis" run "$BASE/api/openapi.json" \
    --url "$BASE" \
    --checks "$CHECKS" \
    --max-examples "$MAX_EXAMPLES" \
    --exclude-path /api/events \
    --exclude-path /admin \
    --request-timeout 10 \
    --report junit --report-junit-path "$JUNIT" \
    --no-color \
    "${seed[@]}")
rc=$?
set -e

alive=yes
kill -0 "$SERVER_PID" 2>/dev/null || alive=no
counts="$("$PY" - "$JUNIT" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("no report")
    sys.exit(0)
cases = root.findall(".//testcase")
bad = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
ops = [c for c in cases if c.get("name", "").split(" ")[0] in ("GET", "POST")]
stateful = "stateful ok" if all(c.get("name") not in bad for c in cases if c not in ops) else "stateful failed"
failed = f" ({', '.join(bad)})" if bad else ""
print(f"{len(ops)} operations, {len(bad)} failed{failed}, {stateful}")
EOF
)"
if [ "$alive" = no ]; then
    log "the server died during the run; its log: $SERVER_LOG"
    [ "$rc" -eq 0 ] && rc=3
fi
if [ "$rc" -eq 124 ]; then
    echo "api-fuzz: FAIL: timed out after ${TIME_LIMIT}s ($counts; report $JUNIT)"
elif [ "$rc" -eq 0 ]; then
    echo "api-fuzz: PASS: $counts, checks $CHECKS, max $MAX_EXAMPLES examples per operation"
else
    echo "api-fuzz: FAIL: $counts (schemathesis exit $rc; server alive: $alive; report $JUNIT, server log $SERVER_LOG)"
fi
exit "$rc"
