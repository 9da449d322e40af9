#!/usr/bin/env bash
# Tether and Nchan side by side (performance issue): the same `tether bench` scenarios
# against a fresh Tether and a fresh nginx + Nchan for every run, alternating the two,
# ROUNDS times. Collects every JSON line into $OUT/results.jsonl, draws
# docs/bench-compare.png with bench-chart and writes a section into BENCHMARKS.md
# between the bench-compare markers (replacing the previous one).
#
#   bash scripts/bench-compare.sh                            # the full comparison
#   SUBSCRIBERS=1000 ROUNDS=1 bash scripts/bench-compare.sh  # a smoke run (< 2 min)
#   SCENARIOS="chat statsp99" bash scripts/bench-compare.sh  # the optional ones
#
# Optional scenarios (not in the default set; name them in SCENARIOS):
#   chat      CHAT_CONNECTIONS over CHAT_CHANNELS, CHAT_PUBLISHERS publishing through
#             the API to random channels for CHAT_SECS (`tether bench chat`)
#   statsp99  the back-to-back WS burst (SUBSCRIBERS x MESSAGES) with GET /api/stats
#             polled every STATS_EVERY_MS ms (`fanout --poll-stats-ms`); Tether only,
#             Nchan has no stats endpoint
# A run of optional scenarios only writes its own section (SECTION) and chart (CHART),
# so it does not replace the full comparison's.
#
# Environment (defaults in brackets):
#   ROUNDS [2]             pairs of runs per scenario
#   SCENARIOS ["idle idlesse fanout paced sse churn"]; optional: chat statsp99
#   SUBSCRIBERS [10000]    fan-out subscribers; IDLE_CONNECTIONS [=SUBSCRIBERS]
#   MESSAGES [200]         back-to-back messages (WS and SSE); BYTES [100]
#   PUBLISHERS [1]         back-to-back publishes in flight at once
#   PACED_MESSAGES [20]    paced messages at RATE [2] msg/s
#   CHURN_SECS [10] CHURN_WORKERS [64]; HOLD_SECS [3] (idle)
#   CHAT_CONNECTIONS [10000] CHAT_CHANNELS [2000] CHAT_PUBLISHERS [8] CHAT_SECS [10]
#   CHAT_RATE [0]          chat publishes/s over all publishers (0: back-to-back)
#   STATS_EVERY_MS [10]    statsp99: the GET /api/stats period
#   PROCS [1]              subscriber processes per bench (needed above ~19k)
#   SOURCES [127.0.0.1]    comma-separated loopback source addresses
#   TETHER_PORT [18700]    (+1 for its API); NCHAN_PORT [18800]
#   OUT [$CARGO_TARGET_DIR or target, /bench-compare]; CHART [docs/bench-compare.png;
#                          docs/bench-compare-chat.png for optional scenarios only]
#   SECTION [bench-compare; bench-compare-chat for optional scenarios only]: the
#                          BENCHMARKS.md markers (<!-- $SECTION:begin/end -->) written
#                          between, or appended at the end
#   NO_BUILD [unset]       skip `cargo build --release`
#   SERVER_BIN [=TETHER_BIN] the Tether that serves (an older build, for a before/after
#                          run with today's load generator)
#   TETHER_BIN, BENCH_CHART_BIN [$CARGO_TARGET_DIR/release/…] (copied before use, so
#                          a rebuild during the run does not change them)
#   NO_DOC [unset]         do not touch BENCHMARKS.md
# Extra Tether settings can be given the usual way (TETHER_LOG__LEVEL=warn, …).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ROUNDS="${ROUNDS:-2}"
DEFAULT_SCENARIOS="idle idlesse fanout paced sse churn"
OPTIONAL_SCENARIOS="chat statsp99"
SCENARIOS="${SCENARIOS:-$DEFAULT_SCENARIOS}"
SUBSCRIBERS="${SUBSCRIBERS:-10000}"
IDLE_CONNECTIONS="${IDLE_CONNECTIONS:-$SUBSCRIBERS}"
MESSAGES="${MESSAGES:-200}"
BYTES="${BYTES:-100}"
PUBLISHERS="${PUBLISHERS:-1}"
PACED_MESSAGES="${PACED_MESSAGES:-20}"
RATE="${RATE:-2}"
CHURN_SECS="${CHURN_SECS:-10}"
CHURN_WORKERS="${CHURN_WORKERS:-64}"
CHAT_CONNECTIONS="${CHAT_CONNECTIONS:-10000}"
CHAT_CHANNELS="${CHAT_CHANNELS:-2000}"
CHAT_PUBLISHERS="${CHAT_PUBLISHERS:-8}"
CHAT_SECS="${CHAT_SECS:-10}"
CHAT_RATE="${CHAT_RATE:-0}"
STATS_EVERY_MS="${STATS_EVERY_MS:-10}"
HOLD_SECS="${HOLD_SECS:-3}"
PROCS="${PROCS:-1}"
SOURCES="${SOURCES:-127.0.0.1}"
TETHER_PORT="${TETHER_PORT:-18700}"
TETHER_API_PORT=$((TETHER_PORT + 1))
NCHAN_PORT="${NCHAN_PORT:-18800}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUT:-$TARGET_DIR/bench-compare}"
# Only optional scenarios: their own section and chart.
only_optional=1
for s in $SCENARIOS; do
    case " $OPTIONAL_SCENARIOS " in *" $s "*) ;; *) only_optional=0 ;; esac
done
if [ "$only_optional" -eq 1 ]; then
    SECTION="${SECTION:-bench-compare-chat}"
    CHART="${CHART:-docs/bench-compare-chat.png}"
else
    SECTION="${SECTION:-bench-compare}"
    CHART="${CHART:-docs/bench-compare.png}"
fi
FONT=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
BIN="${TETHER_BIN:-$TARGET_DIR/release/tether}"
SERVER="${SERVER_BIN:-$BIN}"
CHART_BIN="${BENCH_CHART_BIN:-$TARGET_DIR/release/bench-chart}"

log() { printf '[bench-compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

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

# ---------------------------------------------------------------------------
# Dependencies: nginx, the Nchan module, a font for the chart.
# ---------------------------------------------------------------------------
install_deps() {
    local missing=() pkg
    for pkg in nginx libnginx-mod-nchan fonts-dejavu-core; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing ${missing[*]}"
    # Keep Debian's own nginx service from starting on port 80 during the install
    # (a temporary policy-rc.d, only when the machine has none).
    local policy=/usr/sbin/policy-rc.d added=0
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        added=1
    fi
    if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    fi
    local rc=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" || rc=$?
    [ "$added" -eq 1 ] && as_root rm -f "$policy"
    return "$rc"
}

nchan_module() {
    local m=/usr/lib/nginx/modules/ngx_nchan_module.so conf
    if [ -f "$m" ]; then
        echo "$m"
        return
    fi
    # Debian's modules-available file names it relative to nginx's prefix.
    conf="$(ls /usr/share/nginx/modules-available/*nchan*.conf 2>/dev/null | head -n1 || true)"
    if [ -n "$conf" ]; then
        m="$(sed -n 's/^[[:space:]]*load_module[[:space:]]\+\([^;]*\);.*/\1/p' "$conf" | head -n1)"
        case "$m" in
            /*) ;;
            *) m="/usr/share/nginx/$m" ;;
        esac
        if [ -f "$m" ]; then
            echo "$m"
            return
        fi
    fi
    echo "cannot find ngx_nchan_module.so (libnginx-mod-nchan)" >&2
    return 1
}

# ---------------------------------------------------------------------------
# Servers: started fresh for every run, stopped by PID.
# ---------------------------------------------------------------------------
SERVER_PID=""
SERVER_PIDS=""
WORKER_PIDS=""
TMP=""

cleanup() {
    stop_server || true
    [ -n "$TMP" ] && rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    local port="$1" i
    for i in $(seq 1 100); do
        port_busy "$port" && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || {
            echo "server $SERVER_PID died at start" >&2
            return 1
        }
        sleep 0.1
    done
    echo "port $port did not open within 10 s" >&2
    return 1
}

write_configs() {
    cat >"$TMP/tether.toml" <<EOF
# bench-compare: defaults, except a shutdown that does not wait (every run gets a
# fresh server and its clients are gone when it is stopped).
[shutdown]
pre_drain_ms = 0
drain_window_ms = 0
timeout_ms = 3000
EOF
    mkdir -p "$TMP/nginx"
    cat >"$TMP/nginx/nginx.conf" <<EOF
load_module $NCHAN_MODULE;
worker_processes 2;
worker_rlimit_nofile 20000;
pid $TMP/nginx/nginx.pid;
error_log $OUT/logs/nginx-error.log warn;
daemon off;
events {
    worker_connections 19500;
}
http {
    access_log off;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    server {
        listen 127.0.0.1:$NCHAN_PORT;
        location ~ ^/pub/(\w+)\$ {
            nchan_publisher;
            nchan_channel_id \$1;
        }
        location ~ ^/sub/(\w+)\$ {
            nchan_subscriber;
            nchan_channel_id \$1;
            nchan_subscriber_first_message newest;
        }
    }
}
EOF
}

start_server() { # target tag
    local target="$1" tag="$2"
    case "$target" in
        tether)
            port_busy "$TETHER_PORT" && { echo "port $TETHER_PORT is in use" >&2; return 1; }
            "$SERVER" serve --config "$TMP/tether.toml" --listen "127.0.0.1:$TETHER_PORT" \
                --api-listen "127.0.0.1:$TETHER_API_PORT" >"$OUT/logs/$tag.log" 2>&1 &
            SERVER_PID=$!
            WORKER_PIDS=""
            wait_port "$TETHER_API_PORT"
            wait_port "$TETHER_PORT"
            SERVER_PIDS="$SERVER_PID"
            ;;
        nchan)
            port_busy "$NCHAN_PORT" && { echo "port $NCHAN_PORT is in use" >&2; return 1; }
            nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" >"$OUT/logs/$tag.log" 2>&1 &
            SERVER_PID=$!
            wait_port "$NCHAN_PORT"
            local i
            for i in $(seq 1 50); do
                WORKER_PIDS="$(ps --ppid "$SERVER_PID" -o pid= | tr -s ' \n' ' ' | sed 's/^ //;s/ $//')"
                [ "$(echo "$WORKER_PIDS" | wc -w)" -ge 2 ] && break
                sleep 0.1
            done
            SERVER_PIDS="$(echo "$SERVER_PID $WORKER_PIDS" | tr ' ' ',')"
            ;;
    esac
}

stop_server() {
    [ -z "$SERVER_PID" ] && return 0
    local pid="$SERVER_PID" i
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    # Tether: a second signal stops hard. Then KILL, as a last resort.
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in $WORKER_PIDS; do
        kill -0 "$i" 2>/dev/null && kill -KILL "$i" 2>/dev/null || true
    done
    SERVER_PID=""
    SERVER_PIDS=""
    WORKER_PIDS=""
}

# ---------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------
bench_args() { # scenario target -> the `tether bench` arguments (PIDs as $PIDS)
    local scenario="$1" target="$2" url api
    if [ "$target" = tether ]; then
        url="ws://127.0.0.1:$TETHER_PORT/ws"
        api="http://127.0.0.1:$TETHER_API_PORT"
    else
        url="ws://127.0.0.1:$NCHAN_PORT/sub"
        api="http://127.0.0.1:$NCHAN_PORT"
    fi
    local common="--target $target --url $url --sources $SOURCES --procs $PROCS --pid \$PIDS"
    case "$scenario" in
        idle) echo "idle $common --channel idle --connections $IDLE_CONNECTIONS --hold-secs $HOLD_SECS" ;;
        idlesse) echo "idle $common --transport sse --channel idle --connections $IDLE_CONNECTIONS --hold-secs $HOLD_SECS" ;;
        fanout) echo "fanout $common --api $api --channel bench --subscribers $SUBSCRIBERS --messages $MESSAGES --bytes $BYTES --publishers $PUBLISHERS" ;;
        paced) echo "fanout $common --api $api --channel paced --subscribers $SUBSCRIBERS --messages $PACED_MESSAGES --rate $RATE --bytes $BYTES" ;;
        sse) echo "fanout $common --api $api --transport sse --channel ssebench --subscribers $SUBSCRIBERS --messages $MESSAGES --bytes $BYTES --publishers $PUBLISHERS" ;;
        churn)
            local c="churn --target $target --url $url --workers $CHURN_WORKERS --secs $CHURN_SECS --channel churn"
            [ "$target" = tether ] && c="$c --api $api"
            echo "$c"
            ;;
        chat) echo "chat $common --api $api --connections $CHAT_CONNECTIONS --channels $CHAT_CHANNELS --publishers $CHAT_PUBLISHERS --secs $CHAT_SECS --rate $CHAT_RATE --bytes $BYTES" ;;
        statsp99) echo "fanout $common --api $api --channel statsburst --subscribers $SUBSCRIBERS --messages $MESSAGES --bytes $BYTES --publishers $PUBLISHERS --poll-stats-ms $STATS_EVERY_MS" ;;
        *)
            echo "unknown scenario $scenario" >&2
            return 1
            ;;
    esac
}

# Scenarios Nchan cannot run (statsp99: it has no stats endpoint).
runs_on() { # scenario target
    [ "$1" != statsp99 ] || [ "$2" = tether ]
}

run_one() { # round scenario target
    local round="$1" scenario="$2" target="$3" tag="r$1-$2-$3" args line rc=0
    if ! runs_on "$scenario" "$target"; then
        log "round $round $scenario $target: skipped (Nchan has no stats endpoint)"
        return 0
    fi
    args="$(bench_args "$scenario" "$target")"
    start_server "$target" "$tag-server"
    log "round $round $scenario $target (server pids $SERVER_PIDS)"
    # shellcheck disable=SC2086 # the arguments are words
    line="$(timeout 600 "$BIN" bench ${args//\$PIDS/$SERVER_PIDS} 2>"$OUT/logs/$tag-bench.err" | tail -n1)" || rc=$?
    stop_server
    if [ "$rc" -ne 0 ] || [ "${line:0:1}" != "{" ]; then
        log "FAILED: round $round $scenario $target (exit $rc): $(tail -n3 "$OUT/logs/$tag-bench.err" | tr '\n' ' ')"
        FAILURES=$((FAILURES + 1))
        [ "${line:0:1}" = "{" ] || return 0
    fi
    echo "{\"round\":$round,\"label\":\"$scenario\",${line:1}" >>"$RESULTS"
    log "  $(echo "$line" | grep -o '"deliveries_per_sec":[0-9.]*\|"publishes_per_sec":[0-9.]*\|"pss_bytes_per_connection":[-0-9.]*\|"cycles_per_sec":[0-9.]*\|"latency_ms_p99":[0-9.]*\|"deliveries":[0-9]*\|"opened":[0-9]*' | tr '\n' ' ')"
}

# ---------------------------------------------------------------------------
# The BENCHMARKS.md section.
# ---------------------------------------------------------------------------
write_section() {
    local tables="$1" section="$OUT/section.md" debian nginx_v nchan_v commit
    debian="$(cat /etc/debian_version 2>/dev/null || echo '?')"
    nginx_v="$(nginx -v 2>&1 | sed 's/^nginx version: //')"
    nchan_v="$(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null || echo '?')"
    commit="$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    {
        echo "<!-- $SECTION:begin -->"
        if [ "$SECTION" = bench-compare ]; then
            echo "## Tether vs Nchan ($(date -u +%F))"
        else
            echo "## Tether vs Nchan: $SCENARIOS ($(date -u +%F))"
        fi
        echo
        echo "Generated by \`scripts/bench-compare.sh\` at commit $commit: every run on a fresh"
        echo "server, Tether and Nchan alternating, $ROUNDS round(s); figures are the mean over"
        echo "rounds with the range in parentheses; every run's JSON is in \`${OUT#"$ROOT"/}/results.jsonl\` (not kept in the repository)."
        echo "Machine: $(nproc) cores, kernel $(uname -r), Debian $debian, $nginx_v,"
        echo "libnginx-mod-nchan $nchan_v. Server CPU and memory are summed over the server's"
        echo "processes (Tether: one; Nchan: the nginx master and its 2 workers). Idle and"
        echo "fan-out connections are subscribed to a channel on both; a churn cycle is connect,"
        echo "welcome, subscribe, subscribed, close on Tether and connect (which subscribes), close"
        echo "on Nchan. Latency is measured by the receivers from the publish time in the payload."
        case " $SCENARIOS " in
            *" chat "*)
                echo "Chat: connection i subscribes to channel i % channels; each publisher posts to a"
                echo "random channel when its previous publish is answered (or at CHAT_RATE over all);"
                echo "publishes/s counts 2xx answers over the publishing time, deliveries/s runs from the"
                echo "first publish to the last delivery."
                ;;
        esac
        case " $SCENARIOS " in
            *" statsp99 "*)
                echo "statsp99: the back-to-back burst with one \`GET /api/stats\` at a time every"
                echo "$STATS_EVERY_MS ms from the first publish to the last delivery (Tether only: Nchan"
                echo "has no stats endpoint)."
                ;;
        esac
        echo
        echo '```sh'
        echo "$RUN_CMD"
        echo "# Tether, fresh for every run (tether.toml: [shutdown] pre_drain_ms = 0, drain_window_ms = 0):"
        echo "./target/release/tether serve --config tether.toml --listen 127.0.0.1:$TETHER_PORT --api-listen 127.0.0.1:$TETHER_API_PORT &"
        echo "# Nchan, fresh for every run:"
        echo "nginx -p \$DIR -c \$DIR/nginx.conf   # worker_processes 2; worker_rlimit_nofile 20000; worker_connections 19500;"
        echo "#   location ~ ^/pub/(\\w+)\$ { nchan_publisher; nchan_channel_id \$1; }"
        echo "#   location ~ ^/sub/(\\w+)\$ { nchan_subscriber; nchan_channel_id \$1; nchan_subscriber_first_message newest; }"
        echo "# Each scenario, with PIDS = the server's PIDs (comma-separated):"
        local s t
        for s in $SCENARIOS; do
            for t in tether nchan; do
                runs_on "$s" "$t" || continue
                echo "./target/release/tether bench $(bench_args "$s" "$t")"
            done
        done
        echo '```'
        echo
        cat "$tables"
        echo "![Tether vs Nchan]($CHART)"
        echo
        echo "<!-- $SECTION:end -->"
    } >"$section"
    local md=BENCHMARKS.md tmp
    tmp="$(mktemp)"
    local begin="<!-- $SECTION:begin -->" end="<!-- $SECTION:end -->"
    if grep -qF "$begin" "$md" && grep -qF "$end" "$md"; then
        awk -v f="$section" -v b="$begin" -v e="$end" '
            $0 == b { while ((getline l < f) > 0) print l; skip = 1; next }
            $0 == e { skip = 0; next }
            !skip { print }
        ' "$md" >"$tmp"
    else
        { cat "$md"; echo; cat "$section"; } >"$tmp"
    fi
    cat "$tmp" >"$md"
    rm -f "$tmp"
}

main() {
    local started=$SECONDS
    local vars="ROUNDS SUBSCRIBERS IDLE_CONNECTIONS MESSAGES PACED_MESSAGES RATE BYTES PUBLISHERS PROCS SOURCES"
    case " $SCENARIOS " in *" chat "*) vars="$vars CHAT_CONNECTIONS CHAT_CHANNELS CHAT_PUBLISHERS CHAT_SECS CHAT_RATE" ;; esac
    case " $SCENARIOS " in *" statsp99 "*) vars="$vars STATS_EVERY_MS" ;; esac
    RUN_CMD="$(
        [ "$SCENARIOS" = "$DEFAULT_SCENARIOS" ] || printf 'SCENARIOS="%s" ' "$SCENARIOS"
        for v in $vars; do printf '%s=%s ' "$v" "${!v}"; done
    )bash scripts/bench-compare.sh"
    install_deps
    NCHAN_MODULE="$(nchan_module)"
    if [ -z "${NO_BUILD:-}" ]; then
        log "cargo build --release"
        cargo build --release
    fi
    [ -x "$BIN" ] && [ -x "$CHART_BIN" ] || { echo "no $BIN or $CHART_BIN: build first" >&2; exit 1; }
    rm -rf "$OUT/logs"
    mkdir -p "$OUT/logs"
    OUT="$(cd "$OUT" && pwd)"
    TMP="$(mktemp -d /tmp/bench-compare.XXXXXX)"
    cp "$SERVER" "$TMP/tether-server"
    SERVER="$TMP/tether-server"
    cp "$BIN" "$TMP/tether"
    cp "$CHART_BIN" "$TMP/bench-chart"
    BIN="$TMP/tether"
    CHART_BIN="$TMP/bench-chart"
    write_configs
    nginx -t -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" >"$OUT/logs/nginx-t.log" 2>&1 \
        || { cat "$OUT/logs/nginx-t.log" >&2; exit 1; }
    RESULTS="$OUT/results.jsonl"
    : >"$RESULTS"
    FAILURES=0
    local round scenario first second
    for round in $(seq 1 "$ROUNDS"); do
        # Alternate which goes first, round by round.
        if [ $((round % 2)) -eq 1 ]; then first=tether second=nchan; else first=nchan second=tether; fi
        for scenario in $SCENARIOS; do
            run_one "$round" "$scenario" "$first"
            run_one "$round" "$scenario" "$second"
        done
    done
    log "$(wc -l <"$RESULTS") results in $RESULTS, $FAILURES failed run(s), $((SECONDS - started)) s"
    local subtitle
    subtitle="$(date -u +%F), $(nproc) cores, kernel $(uname -r), Debian $(cat /etc/debian_version 2>/dev/null), $(nginx -v 2>&1 | sed 's/^nginx version: //'), nchan $(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null); $ROUNDS round(s), $SUBSCRIBERS subscribers"
    "$CHART_BIN" --input "$RESULTS" --output "$CHART" --font "$FONT" \
        --subtitle "$subtitle" --markdown "$OUT/tables.md"
    if [ -z "${NO_DOC:-}" ]; then
        write_section "$OUT/tables.md"
        log "BENCHMARKS.md section written; chart $CHART"
    fi
    [ "$FAILURES" -eq 0 ]
}

main "$@"
