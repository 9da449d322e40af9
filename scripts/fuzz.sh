#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (not part of CI's critical path).
#   bash scripts/fuzz.sh            # 30 s per target
#   SECONDS_PER_TARGET=300 bash scripts/fuzz.sh client_frame
# A crash leaves its input in fuzz/artifacts/<target>/: turn it into a regression test
# (a unit test decoding that input) before fixing the code.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# cargo-fuzz needs nightly flags (sanitizers); the machine's one toolchain is stable.
export RUSTC_BOOTSTRAP=1
TARGETS=("$@")
[ "${#TARGETS[@]}" -eq 0 ] && TARGETS=(client_frame sse_cursor config jwt)
SECS="${SECONDS_PER_TARGET:-30}"
for t in "${TARGETS[@]}"; do
    echo "== fuzz $t for ${SECS}s"
    cargo fuzz run "$t" -- -max_total_time="$SECS" -rss_limit_mb=2048
done
echo "fuzz: ${#TARGETS[@]} targets ran ${SECS}s each without a crash"
