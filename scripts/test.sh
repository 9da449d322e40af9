#!/usr/bin/env bash
# The project's whole check: installs what the tests need (idempotent, safe to
# rerun), then runs formatting, lints, the build, the Rust tests and the Python
# interop tests against the real binary.
#
#   bash scripts/test.sh            # every step
#   bash scripts/test.sh py         # only the named steps (see STEPS below)
#
# Runnable from any directory; .ci/run calls it with no arguments.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY_REQS="$ROOT/tests/python/requirements.txt"

section() {
    printf '\n==================== %s ====================\n' "$*"
}

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root to run: $*" >&2
        return 1
    fi
}

APT_UPDATED=0
# apt_install PKG...: installs the Debian packages that are not installed yet.
apt_install() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        local status
        status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
        if [ "$status" != "install ok installed" ]; then
            missing+=("$pkg")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
}

# ---------------------------------------------------------------------------
# Setup steps. Each installs one kind of dependency and is a no-op when it is
# already there.
# ---------------------------------------------------------------------------

setup_python() {
    section "setup: python venv ($VENV)"
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        rm -rf "$VENV"
        # Debian's own python3 needs python3-venv for `-m venv` (pyenv builds have
        # it): install it only when creating the venv fails without it.
        if ! python3 -m venv "$VENV"; then
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    # Reinstall only when requirements.txt changed since the last install.
    local stamp="$VENV/.tether-requirements.sha256"
    local want
    want="$(sha256sum "$PY_REQS" | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] \
        || ! "$VENV/bin/python" -c 'import pytest, websockets, requests' >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$PY_REQS"
        echo "$want" >"$stamp"
    fi
    "$VENV/bin/python" -c 'import pytest, websockets, requests; print("pytest", pytest.__version__, "| websockets", websockets.__version__, "| requests", requests.__version__)'
}

setup_browser() {
    section "setup: chromium + playwright-core (tests/browser)"
    apt_install chromium
    command -v node >/dev/null 2>&1 || apt_install nodejs npm
    # playwright-core drives Debian's chromium; it never downloads a browser.
    (cd "$ROOT/tests/browser" && npm ci --no-audit --no-fund --loglevel=error)
    chromium --version
}

setup_autobahn() {
    section "setup: Autobahn|Testsuite py2.7 virtualenv (.venv-autobahn)"
    # Python 2.7 from pyenv, autobahntestsuite and its pins from
    # tests/autobahn/requirements-py27.txt; a no-op when they are already there.
    # wsaccel and autobahn build from sdists: they need a C compiler.
    command -v cc >/dev/null 2>&1 || apt_install gcc
    bash "$ROOT/scripts/autobahn.sh" --setup
    "$ROOT/.venv-autobahn/bin/wstest" --autobahnversion
}

setup_netns() {
    section "setup: iproute2 + nftables (network-namespace tests, as root)"
    apt_install iproute2 nftables
}

setup_redis() {
    section "setup: redis-server + redis-tools (cluster-mode tests start their own, on free ports)"
    apt_install redis-server redis-tools
    # Debian's package starts a service on 6379; the tests never use it. Stop it so it
    # holds no port and no memory (no-op without systemd).
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
        as_root systemctl stop redis-server || true
    fi
    redis-server --version
}

setup_promtool() {
    section "setup: promtool (Debian package prometheus)"
    command -v promtool >/dev/null 2>&1 || apt_install prometheus
    promtool --version | head -n 1
}

setup_package() {
    section "setup: cargo-deb, binutils, systemd-analyze (scripts/package-test.sh)"
    bash "$ROOT/scripts/package-test.sh" --setup
    cargo deb --version
}

# >>> EXTENSION POINT: more setup steps go here.
# >>> Write each as a setup_* function using apt_install, and add it to SETUP_FOR
# >>> below next to the steps that need it.

# ---------------------------------------------------------------------------
# Check steps.
# ---------------------------------------------------------------------------

step_fmt() {
    section "cargo fmt --check"
    cargo fmt --all -- --check
}

step_clippy() {
    section "cargo clippy"
    cargo clippy --all-targets -- -D warnings
}

step_build() {
    section "cargo build"
    cargo build
}

step_rust() {
    if cargo nextest --version >/dev/null 2>&1; then
        section "cargo nextest run --workspace"
        cargo nextest run --workspace
    else
        section "cargo test --workspace (cargo-nextest not installed)"
        cargo test --workspace
    fi
}

step_py() {
    section "python interop tests (tests/python)"
    # The tests start target/debug/tether; make sure it is the current one.
    cargo build --quiet
    TETHER_BIN="$ROOT/target/debug/tether" "$VENV/bin/python" -m pytest -q tests/python
}

step_browser() {
    section "browser tests: headless chromium, native EventSource, the SDK and the /admin dashboard (tests/browser, clients/js)"
    cargo build --quiet
    # The browser SDK's own unit tests (Node's built-in runner, no browser needed).
    node --test clients/js
    (cd "$ROOT/tests/browser" && TETHER_BIN="$ROOT/target/debug/tether" node --test)
}

step_autobahn() {
    section "websocket compliance: Autobahn|Testsuite fuzzingclient through a proxy route (tests/autobahn)"
    cargo build --quiet
    TETHER_BIN="$ROOT/target/debug/tether" ECHO_PYTHON="$VENV/bin/python" \
        bash "$ROOT/scripts/autobahn.sh"
}

step_alerts() {
    section "alert rules and a live scrape: promtool (docs/alerts.yml)"
    promtool check rules docs/alerts.yml
    # Each alert fires over its threshold after its `for:`, and not under it.
    promtool test rules docs/alerts_test.yml
    # `promtool check metrics` on a live /metrics scrape, in the integration test
    # that requires promtool here rather than skipping without it.
    if cargo nextest --version >/dev/null 2>&1; then
        TETHER_REQUIRE_PROMTOOL=1 cargo nextest run -p tether --test it metrics::promtool_accepts_a_scrape
    else
        TETHER_REQUIRE_PROMTOOL=1 cargo test -p tether --test it metrics::promtool_accepts_a_scrape
    fi
}

step_package() {
    section "Debian package: cargo deb, dpkg -i, systemd-analyze verify, run, drain, purge (scripts/package-test.sh)"
    bash "$ROOT/scripts/package-test.sh"
}

# >>> EXTENSION POINT: more check steps go here (cluster tests against Redis).
# >>> Add each to STEPS, and its setup to SETUP_FOR.

STEPS=(fmt clippy build rust alerts py browser autobahn package)

# The setup functions each step needs (space-separated).
declare -A SETUP_FOR=(
    [py]="setup_python"
    [rust]="setup_netns setup_redis setup_promtool"
    [alerts]="setup_promtool"
    [browser]="setup_browser"
    [autobahn]="setup_python setup_autobahn"
    [package]="setup_package"
)

main() {
    local selected=("$@")
    [ "${#selected[@]}" -eq 0 ] && selected=("${STEPS[@]}")
    local s k known
    for s in "${selected[@]}"; do
        known=0
        for k in "${STEPS[@]}"; do [ "$k" = "$s" ] && known=1; done
        if [ "$known" -eq 0 ]; then
            echo "unknown step '$s'; steps: ${STEPS[*]}" >&2
            exit 2
        fi
    done

    # Setup first, each setup function once, so a missing dependency fails fast.
    declare -A done_setup=()
    local fn
    for s in "${selected[@]}"; do
        for fn in ${SETUP_FOR[$s]:-}; do
            if [ -z "${done_setup[$fn]:-}" ]; then
                "$fn"
                done_setup[$fn]=1
            fi
        done
    done

    for s in "${selected[@]}"; do
        "step_$s"
    done
    section "all steps passed: ${selected[*]}"
}

main "$@"
