#!/usr/bin/env bash
# Instructions per call of the Redis ledger's client side (callgrind), queued and sync commits.
#   bash bench/instr_count_redis.sh [mode ...]          # modes: queued async sync (default: all)
#   SRC=/other/src bash bench/instr_count_redis.sh      # another checkout's code
# Prints "mode: N instructions per call" (reserve + commit, two scopes); ~3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
CALLS="${CALLS:-2000}"
# shellcheck source=bench/callgrind_ready.sh
. bench/callgrind_ready.sh
modes=("$@")
[ ${#modes[@]} -eq 0 ] && modes=(queued async sync)
for mode in "${modes[@]}"; do
    ir=$(counted "$mode" bench/instr_count_redis.py "$mode" "$CALLS")
    echo "$mode: $((ir / CALLS)) instructions per call"
done
