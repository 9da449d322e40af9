#!/usr/bin/env bash
# The Debian package, end to end: builds it with cargo-deb, installs it with dpkg,
# checks what it put where, verifies the systemd unit, runs the installed binary on
# the installed config, removes and purges it, and checks nothing is left.
#
#   bash scripts/package-test.sh           # scripts/test.sh runs it as step `package`
#   bash scripts/package-test.sh --setup   # only install the tools (cargo-deb, ...)
#
# What it checks, in order (any mismatch fails the run, exit 1):
#   - `cargo deb -p tether --fast` builds target/debian/tether_*.deb (release; an
#     up-to-date target/release is reused, so a rerun does not rebuild)
#   - dpkg -i: /usr/bin/tether, /etc/tether/tether.toml (a conffile, byte-equal to
#     `tether config default`), /usr/lib/systemd/system/tether.service with its
#     hardening lines, the unit enabled (multi-user.target.wants) but not started
#   - systemd-analyze verify on the installed unit (no warning), and its offline
#     security exposure at most 2.0
#   - /usr/bin/tether serve on /etc/tether/tether.toml as an unprivileged user (like
#     the unit's DynamicUser), on free loopback ports: /healthz and /readyz answer,
#     an SSE subscriber gets a message published with `tether publish`, SIGTERM
#     drains (the subscriber gets `closing` 1001) and the process exits 0 before
#     shutdown.timeout_ms
#   - a reinstall over it (the upgrade path) keeps an edit of the conffile
#   - dpkg -r keeps only the conffile; dpkg --purge leaves no file named *tether*
#     under /etc, /usr, /var/lib/systemd or /var/lib/dpkg/info that was not there
#     before the install
#
# Needs root (dpkg). THIS PURGES AN INSTALLED `tether` PACKAGE: run it on a
# development or CI machine, not on a host that runs Tether from the package.
# Idempotent: a rerun after a failure (or a kill) starts from a clean state; the
# EXIT trap stops what it started and purges the package it installed.
# cargo-deb is installed at a pinned version when missing (cached in ~/.cargo/bin).
# Loopback only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CARGO_DEB_VERSION="3.8.0"
UNIT=/usr/lib/systemd/system/tether.service
CONF=/etc/tether/tether.toml
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tether-package-test.XXXXXX")"
SERVER_PID=""
SSE_PID=""
INSTALLED=0

log() { printf 'package-test: %s\n' "$*" >&2; }
die() {
    log "FAIL: $*"
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $*"
    fi
}

stop_pid() {
    local pid="$1"
    [ -n "$pid" ] || return 0
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    stop_pid "$SSE_PID"
    stop_pid "$SERVER_PID"
    if [ "$INSTALLED" -eq 1 ] && dpkg-query -W tether >/dev/null 2>&1; then
        as_root dpkg --purge tether >/dev/null 2>&1 || log "cleanup: dpkg --purge tether failed"
    fi
    if [ "$rc" -ne 0 ] && [ -s "$WORK/server.log" ]; then
        log "server log (tail):"
        tail -n 30 "$WORK/server.log" >&2 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------

apt_install() {
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

setup_tools() {
    local have
    have="$(cargo deb --version 2>/dev/null || true)"
    if [ "${have##* }" != "$CARGO_DEB_VERSION" ]; then
        log "installing cargo-deb $CARGO_DEB_VERSION (found: ${have:-none})"
        cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
    fi
    # dbgsym = true splits the debug info out with objcopy.
    command -v objcopy >/dev/null 2>&1 || apt_install binutils
    command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd
    command -v curl >/dev/null 2>&1 || apt_install curl
    command -v setpriv >/dev/null 2>&1 || apt_install util-linux
}

# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------

build_deb() {
    # Written here even with CARGO_TARGET_DIR set (cargo-deb's default follows it).
    local out="$ROOT/target/debian"
    mkdir -p "$out"
    rm -f "$out"/tether_*.deb "$out"/tether-dbgsym_*.ddeb
    local start end
    start="$(date +%s)"
    # --fast: lighter xz compression (same files; 4.4 instead of 3.7 MiB, and seconds
    # instead of a minute of CPU for the 80 MiB of debug symbols). A release is
    # built with plain `cargo deb -p tether`.
    cargo deb -p tether --fast --output "$out/"
    end="$(date +%s)"
    DEB="$(find "$out" -maxdepth 1 -name 'tether_*.deb' | head -n 1)"
    if [ -z "$DEB" ] || [ ! -f "$DEB" ]; then
        die "no target/debian/tether_*.deb after cargo deb"
    fi
    log "built $(basename "$DEB"): $(du -k "$DEB" | cut -f1) KiB in $((end - start)) s"
}

# ---------------------------------------------------------------------------
# Install and check the files
# ---------------------------------------------------------------------------

# Every file whose name has "tether" in it where the package may leave one.
tether_files() {
    find /etc /usr /var/lib/systemd /var/lib/dpkg/info -xdev -iname '*tether*' \
        2>/dev/null | LC_ALL=C sort
}

purge_leftover() {
    if dpkg-query -W tether >/dev/null 2>&1; then
        log "a tether package is installed (an earlier run?): purging it first"
        as_root dpkg --purge tether
    fi
}

install_deb() {
    tether_files >"$WORK/files.before"
    INSTALLED=1
    as_root dpkg -i "$DEB"
    local status
    status="$(dpkg-query -W -f='${Status}' tether)"
    [ "$status" = "install ok installed" ] || die "dpkg status after install: $status"
}

check_files() {
    [ -x /usr/bin/tether ] || die "/usr/bin/tether missing or not executable"
    /usr/bin/tether --version >/dev/null || die "/usr/bin/tether --version failed"
    [ -f "$CONF" ] || die "$CONF missing"
    [ "$(stat -c %a "$CONF")" = 644 ] || die "$CONF mode $(stat -c %a "$CONF"), want 644"
    /usr/bin/tether config default | cmp -s - "$CONF" \
        || die "$CONF differs from \`tether config default\`"
    /usr/bin/tether config check "$CONF" >/dev/null || die "tether config check $CONF failed"
    [ -f "$UNIT" ] || die "$UNIT missing"
    local conffiles
    conffiles="$(dpkg-query -W -f='${Conffiles}' tether)"
    grep -q "^ $CONF [0-9a-f]\{32\}$" <<<"$conffiles" \
        || die "$CONF is not a conffile: '$conffiles'"
    [ -L /etc/systemd/system/multi-user.target.wants/tether.service ] \
        || die "tether.service not enabled (no multi-user.target.wants link)"
    log "files ok: /usr/bin/tether, $CONF (conffile), $UNIT (enabled)"
}

check_unit_lines() {
    local want
    # shellcheck disable=SC2016 # $MAINPID is systemd's, literal here.
    for want in \
        'ExecStart=/usr/bin/tether serve --config /etc/tether/tether.toml' \
        'ExecReload=/bin/kill -HUP $MAINPID' \
        'LimitNOFILE=1048576' 'DynamicUser=yes' 'ProtectSystem=strict' \
        'ProtectHome=yes' 'PrivateTmp=yes' 'NoNewPrivileges=yes' \
        'CapabilityBoundingSet=' 'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX' \
        'KillSignal=SIGTERM' 'TimeoutStopSec=35' 'Restart=on-failure'; do
        grep -qxF "$want" "$UNIT" || die "$UNIT lacks the line: $want"
    done
    # The stop timeout must outlast the drain's hard deadline.
    local stop_ms timeout_ms
    stop_ms=$(($(sed -n 's/^TimeoutStopSec=\([0-9]*\)$/\1/p' "$UNIT") * 1000))
    timeout_ms="$(sed -n '/^\[shutdown\]/,/^\[/s/^timeout_ms = \([0-9]*\)$/\1/p' "$CONF")"
    [ -n "$timeout_ms" ] || die "no [shutdown] timeout_ms in $CONF"
    [ "$stop_ms" -gt "$timeout_ms" ] \
        || die "TimeoutStopSec ($stop_ms ms) is not above shutdown.timeout_ms ($timeout_ms)"
    SHUTDOWN_TIMEOUT_MS="$timeout_ms"
}

verify_unit() {
    local out
    if ! out="$(systemd-analyze verify "$UNIT" 2>&1)"; then
        printf '%s\n' "$out" >&2
        die "systemd-analyze verify $UNIT failed"
    fi
    # verify exits 0 on some warnings; it prints nothing for a clean unit.
    if grep -i 'tether' <<<"$out" >&2; then
        die "systemd-analyze verify $UNIT warned about the unit"
    fi
    log "systemd-analyze verify: clean"
    # The unit scores 1.5 ("OK"); weakening its hardening past 2.0 fails here.
    if ! out="$(systemd-analyze security --offline=yes --threshold=20 "$UNIT" 2>&1)"; then
        printf '%s\n' "$out" >&2
        die "systemd-analyze security: exposure above 2.0"
    fi
    tail -n 1 <<<"$out" >&2
}

# ---------------------------------------------------------------------------
# Run the installed binary
# ---------------------------------------------------------------------------

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_for SECONDS CMD...: runs CMD every 0.1 s until it succeeds or SECONDS pass.
wait_for() {
    local tries=$(($1 * 10))
    shift
    local i
    for ((i = 0; i < tries; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}

start_server() {
    PORT="$(free_port)"
    API_PORT="$(free_port)"
    [ "$PORT" != "$API_PORT" ] || API_PORT="$(free_port)"
    # As nobody, like DynamicUser: the installed config must be readable by it.
    local run=()
    [ "$(id -u)" -eq 0 ] && run=(setpriv --reuid=65534 --regid=65534 --clear-groups)
    (cd / && exec "${run[@]}" /usr/bin/tether serve --config "$CONF" \
        --listen "127.0.0.1:$PORT" --api-listen "127.0.0.1:$API_PORT") \
        >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    wait_for 20 curl -fsS "http://127.0.0.1:$PORT/healthz" \
        || die "/healthz on 127.0.0.1:$PORT did not answer within 20 s"
    log "installed tether serving on 127.0.0.1:$PORT (API $API_PORT), pid $SERVER_PID"
}

check_serving() {
    local body
    body="$(curl -fsS "http://127.0.0.1:$PORT/healthz")"
    [ "$body" = '{"status":"ok"}' ] || die "/healthz answered: $body"
    body="$(curl -fsS "http://127.0.0.1:$API_PORT/readyz")"
    [ "$body" = '{"status":"ready"}' ] || die "/readyz answered: $body"
    curl -fsS -N --max-time 60 \
        "http://127.0.0.1:$PORT/sse?client=pkgtest&channel=pkg" >"$WORK/sse.out" 2>/dev/null &
    SSE_PID=$!
    wait_for 10 grep -q '^event: welcome' "$WORK/sse.out" \
        || die "the SSE subscriber got no welcome"
    local answer
    answer="$(/usr/bin/tether publish --api "http://127.0.0.1:$API_PORT" \
        --channel pkg '{"from":"package-test"}')"
    grep -q '"subscribers":1' <<<"$answer" || die "publish answered: $answer"
    wait_for 10 grep -q '"data":{"from":"package-test"}' "$WORK/sse.out" \
        || die "the SSE subscriber did not get the published message"
    log "healthz, readyz, publish -> SSE subscriber: ok"
}

# SIGTERM: a drain, the subscriber told `closing` 1001, exit 0 before the deadline.
check_drain() {
    local start end rc=0
    start="$(date +%s%N)"
    kill -TERM "$SERVER_PID"
    # A watchdog: SIGKILL (exit 137, a failure below) if it outlives the deadline.
    local limit_s=$((SHUTDOWN_TIMEOUT_MS / 1000 + 5))
    (sleep "$limit_s" && kill -KILL "$SERVER_PID" 2>/dev/null) &
    local watchdog=$!
    wait "$SERVER_PID" || rc=$?
    SERVER_PID=""
    kill "$watchdog" 2>/dev/null || true
    wait "$watchdog" 2>/dev/null || true
    end="$(date +%s%N)"
    local took_ms=$(((end - start) / 1000000))
    [ "$rc" -eq 0 ] || die "tether exited $rc after SIGTERM"
    [ "$took_ms" -lt "$SHUTDOWN_TIMEOUT_MS" ] \
        || die "drain took $took_ms ms, not under shutdown.timeout_ms $SHUTDOWN_TIMEOUT_MS"
    grep -q '"code":1001' "$WORK/sse.out" || die "the SSE subscriber got no closing 1001"
    wait "$SSE_PID" 2>/dev/null || true
    SSE_PID=""
    grep -q 'shutdown: drained' "$WORK/server.log" || die "no 'shutdown: drained' in the log"
    log "SIGTERM: drained, exit 0 in $took_ms ms (deadline $SHUTDOWN_TIMEOUT_MS ms)"
}

# An upgrade (here a reinstall of the same .deb, which runs the same maintainer
# script paths) keeps an operator's edit of the conffile, without a prompt.
check_upgrade() {
    local mark="# edited by package-test $$"
    printf '%s\n' "$mark" | as_root tee -a "$CONF" >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive dpkg -i "$DEB" </dev/null
    grep -qxF "$mark" "$CONF" || die "reinstalling the package lost the edit of $CONF"
    [ "$(dpkg-query -W -f='${Status}' tether)" = "install ok installed" ] \
        || die "dpkg status after reinstall: $(dpkg-query -W -f='${Status}' tether)"
    log "reinstall (upgrade path): the edited $CONF kept"
}

# ---------------------------------------------------------------------------
# Remove and purge
# ---------------------------------------------------------------------------

check_remove() {
    as_root dpkg -r tether
    [ ! -e /usr/bin/tether ] || die "/usr/bin/tether left after dpkg -r"
    [ ! -e "$UNIT" ] || die "$UNIT left after dpkg -r"
    [ -f "$CONF" ] || die "dpkg -r removed the conffile (only --purge should)"
    log "dpkg -r: binary and unit gone, $CONF kept"
}

check_purge() {
    as_root dpkg --purge tether
    INSTALLED=0
    if dpkg-query -W -f='${Status}' tether 2>/dev/null | grep -q 'installed'; then
        die "dpkg still lists tether after --purge"
    fi
    [ ! -e /etc/tether ] || die "/etc/tether left after --purge"
    tether_files >"$WORK/files.after"
    if ! diff -u "$WORK/files.before" "$WORK/files.after" >&2; then
        die "files left behind after --purge (above)"
    fi
    log "dpkg --purge: nothing left"
}

main() {
    setup_tools
    if [ "${1:-}" = "--setup" ]; then
        return 0
    fi
    build_deb
    purge_leftover
    install_deb
    check_files
    check_unit_lines
    verify_unit
    start_server
    check_serving
    check_drain
    check_upgrade
    check_remove
    check_purge
    log "all checks passed ($(basename "$DEB"))"
}

main "$@"
