#!/usr/bin/env bash
# WebSocket protocol compliance: runs the Autobahn|Testsuite fuzzing client
# (`wstest -m fuzzingclient`, cases 1-7 and 10) against Tether's WebSocket edge,
# through a proxy route to a small echo upstream:
#
#   wstest ──ws──> tether /echo ──ws──> tests/autobahn/echo_server.py
#
# Fails (exit 1) when a case's behavior is FAILED or its behaviorClose is FAILED
# or UNCLEAN; prints `autobahn: N passed, M failed` and the failing cases.
# Report: target/autobahn/index.html (and index.json, one JSON file per case).
#
#   bash scripts/autobahn.sh           # set up if needed, then run
#   bash scripts/autobahn.sh --setup   # only set up .venv-autobahn
#
# Setup is idempotent: .venv-autobahn (git-ignored) is a Python 2.7 virtualenv
# (the suite is Python 2 only) from pyenv's 2.7.18, with
# tests/autobahn/requirements-py27.txt; a change to that file reinstalls.
# Environment:
#   PY27         Python 2.7 to build the virtualenv from (default: pyenv's 2.7.18,
#                else python2.7 on PATH)
#   ECHO_PYTHON  Python 3 with websockets for the echo upstream (default: .venv,
#                which scripts/test.sh sets up; else .venv-autobahn/echo-py3 is made)
#   TETHER_BIN   the tether binary (default: `cargo build`, then target/debug/tether)
#   AUTOBAHN_TIMEOUT  seconds the whole wstest run may take (default 300)
#   TETHER_*     reach tether as usual: e.g. TETHER_LIMITS__MAX_MESSAGE_BYTES=1000
#                makes cases 1.1.6-1.1.8, 1.2.6-1.2.8 and 10.1.1 fail (a check of the check)
# Loopback only: every server binds 127.0.0.1 on a port the kernel picks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

AB_DIR="$ROOT/tests/autobahn"
AB_VENV="$ROOT/.venv-autobahn"
AB_REQS="$AB_DIR/requirements-py27.txt"
OUTDIR="$ROOT/target/autobahn"
AUTOBAHN_TIMEOUT="${AUTOBAHN_TIMEOUT:-300}"
# The last virtualenv that creates Python 2.7 environments (it seeds pip 20.3.4).
VIRTUALENV_PIN="virtualenv==20.15.1"

log() { printf 'autobahn.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

find_py27() {
    if [ -n "${PY27:-}" ]; then
        echo "$PY27"
        return
    fi
    local root
    if command -v pyenv >/dev/null 2>&1 && root="$(pyenv root 2>/dev/null)" \
        && [ -x "$root/versions/2.7.18/bin/python" ]; then
        echo "$root/versions/2.7.18/bin/python"
        return
    fi
    if command -v python2.7 >/dev/null 2>&1; then
        command -v python2.7
        return
    fi
    die "no Python 2.7 found (pyenv's versions/2.7.18 or python2.7 on PATH; or set PY27)"
}

setup() {
    local stamp="$AB_VENV/.tether-requirements.sha256"
    local want
    want="$(sha256sum "$AB_REQS" | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ] \
        && "$AB_VENV/bin/wstest" --autobahnversion >/dev/null 2>&1; then
        return 0
    fi
    local py27
    py27="$(find_py27)"
    "$py27" -c 'import sys; assert sys.version_info[:2] == (2, 7), sys.version' \
        || die "$py27 is not Python 2.7"
    if [ ! -x "$AB_VENV/bin/python" ] || ! "$AB_VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        log "creating $AB_VENV from $py27"
        rm -rf "$AB_VENV"
        if "$py27" -m virtualenv --version >/dev/null 2>&1; then
            "$py27" -m virtualenv -q "$AB_VENV"
        else
            # pyenv's 2.7 has no virtualenv (and 2.7 has no venv module): install
            # one into a throwaway directory rather than into that Python.
            local boot
            boot="$(mktemp -d)"
            "$py27" -m pip install --quiet --disable-pip-version-check \
                --target "$boot" "$VIRTUALENV_PIN"
            PYTHONPATH="$boot" "$py27" -m virtualenv -q "$AB_VENV"
            rm -rf "$boot"
        fi
    fi
    log "installing $(basename "$AB_REQS") into $AB_VENV"
    "$AB_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$AB_REQS"
    "$AB_VENV/bin/wstest" --autobahnversion >/dev/null
    echo "$want" >"$stamp"
}

# A Python 3 with websockets for the echo upstream.
echo_python() {
    if [ -n "${ECHO_PYTHON:-}" ]; then
        echo "$ECHO_PYTHON"
        return
    fi
    local py
    for py in "$ROOT/.venv/bin/python" "$AB_VENV/echo-py3/bin/python"; do
        if [ -x "$py" ] && "$py" -c 'import websockets.asyncio.server' >/dev/null 2>&1; then
            echo "$py"
            return
        fi
    done
    # Standalone run without scripts/test.sh's .venv: a venv with only websockets,
    # the same version range as tests/python/requirements.txt.
    local spec
    spec="$(grep -E '^websockets' "$ROOT/tests/python/requirements.txt")"
    log "creating .venv-autobahn/echo-py3 ($spec)"
    rm -rf "$AB_VENV/echo-py3"
    python3 -m venv "$AB_VENV/echo-py3" >&2
    "$AB_VENV/echo-py3/bin/python" -m pip install --quiet --disable-pip-version-check "$spec" >&2
    echo "$AB_VENV/echo-py3/bin/python"
}

# wait_for_line FILE REGEX SECONDS PID: prints the first match of REGEX (grep -o)
# in FILE, waiting at most SECONDS; fails early when process PID has exited.
wait_for_line() {
    local file="$1" regex="$2" seconds="$3" pid="$4"
    local deadline=$((SECONDS + seconds)) match
    while [ "$SECONDS" -lt "$deadline" ]; do
        match="$(grep -o -m1 -E "$regex" "$file" 2>/dev/null || true)"
        if [ -n "$match" ]; then
            echo "$match"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

ECHO_PID=""
TETHER_PID=""
WSTEST_PID=""
TMP=""

# stop PID: SIGTERM, then SIGKILL if it is still there after 5 s.
stop() {
    local pid="$1" i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    stop "$WSTEST_PID"
    stop "$TETHER_PID"
    stop "$ECHO_PID"
    [ -n "$TMP" ] && rm -rf "$TMP"
    return 0
}

run() {
    local start=$SECONDS
    local tether="${TETHER_BIN:-}"
    if [ -z "$tether" ]; then
        cargo build --quiet
        tether="$ROOT/target/debug/tether"
    fi
    [ -x "$tether" ] || die "no tether binary at $tether"
    local py3
    py3="$(echo_python)"

    rm -rf "$OUTDIR"
    mkdir -p "$OUTDIR"
    TMP="$(mktemp -d)"
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    # The echo upstream.
    "$py3" "$AB_DIR/echo_server.py" --max-seconds $((AUTOBAHN_TIMEOUT + 120)) \
        >"$OUTDIR/echo.log" 2>&1 &
    ECHO_PID=$!
    local echo_port
    echo_port="$(wait_for_line "$OUTDIR/echo.log" '^PORT [0-9]+' 20 "$ECHO_PID")" \
        || { cat "$OUTDIR/echo.log" >&2; die "the echo upstream did not start"; }
    echo_port="${echo_port#PORT }"

    # Tether with one proxy route; everything else is the default configuration,
    # but shutdown is immediate (no pre-drain) so that the exit trap is quick.
    cat >"$TMP/tether.toml" <<EOF
listen = "127.0.0.1:0"

[api]
listen = "127.0.0.1:0"

[shutdown]
pre_drain_ms = 0
drain_window_ms = 0
timeout_ms = 2000

[[proxy.routes]]
path = "/echo"
upstream = "ws://127.0.0.1:$echo_port/"
EOF
    cp "$TMP/tether.toml" "$OUTDIR/tether.toml"
    "$tether" serve --config "$TMP/tether.toml" >"$OUTDIR/tether.log" 2>&1 &
    TETHER_PID=$!
    local addr
    addr="$(wait_for_line "$OUTDIR/tether.log" 'client_addr=127\.0\.0\.1:[0-9]+' 30 "$TETHER_PID")" \
        || { cat "$OUTDIR/tether.log" >&2; die "tether did not start"; }
    addr="${addr#client_addr=}"
    log "echo upstream on 127.0.0.1:$echo_port, tether on $addr (logs in ${OUTDIR#"$ROOT"/})"

    # The spec, from the template with the URL and the report directory filled in.
    "$AB_VENV/bin/python" - "$AB_DIR/fuzzingclient.json" "$TMP/fuzzingclient.json" \
        "ws://$addr/echo" "$OUTDIR" <<'EOF'
import json, sys
src, dst, url, outdir = sys.argv[1:]
with open(src) as f:
    spec = json.load(f)
spec["outdir"] = outdir
for server in spec["servers"]:
    server["url"] = url
with open(dst, "w") as f:
    json.dump(spec, f, indent=2)
EOF
    cp "$TMP/fuzzingclient.json" "$OUTDIR/fuzzingclient.json"

    # wstest runs in $TMP: it may write files next to where it runs. In the
    # background, so that a signal to this script is handled at once.
    local rc=0
    (cd "$TMP" && exec timeout --kill-after=10 "$AUTOBAHN_TIMEOUT" \
        "$AB_VENV/bin/wstest" -m fuzzingclient -s "$TMP/fuzzingclient.json") \
        >"$OUTDIR/wstest.log" 2>&1 &
    WSTEST_PID=$!
    wait "$WSTEST_PID" || rc=$?
    WSTEST_PID=""
    if [ "$rc" -ne 0 ]; then
        tail -n 30 "$OUTDIR/wstest.log" >&2
        [ "$rc" -eq 124 ] && die "wstest did not finish within ${AUTOBAHN_TIMEOUT}s"
        die "wstest exited with $rc (log: ${OUTDIR#"$ROOT"/}/wstest.log)"
    fi
    kill -0 "$TETHER_PID" 2>/dev/null || die "tether exited during the run (log: ${OUTDIR#"$ROOT"/}/tether.log)"
    [ -f "$OUTDIR/index.json" ] || die "wstest wrote no ${OUTDIR#"$ROOT"/}/index.json"

    rc=0
    "$AB_VENV/bin/python" "$AB_DIR/check_report.py" "$OUTDIR/index.json" || rc=$?
    log "took $((SECONDS - start)) s; report: ${OUTDIR#"$ROOT"/}/index.html"
    return "$rc"
}

case "${1:-}" in
    --setup) setup ;;
    "") setup; run ;;
    *) echo "usage: bash scripts/autobahn.sh [--setup]" >&2; exit 2 ;;
esac
