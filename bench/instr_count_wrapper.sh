#!/usr/bin/env bash
# Instructions per call of each instrumentation's wrapper work (callgrind), side by side.
#   bash bench/instr_count_wrapper.sh [case ...]   # cases: ours official wrapt request response
#   SRC=/path/to/other/src bash bench/instr_count_wrapper.sh ours   # another checkout's code
# Prints "case: N instructions per call"; JSON=path also writes {case: N}. ~4 minutes
# (JOBS=2: two counts at a time; see bench/callgrind_ready.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
CALLS="${CALLS:-200}"
# shellcheck source=bench/callgrind_ready.sh
. bench/callgrind_ready.sh
one() {
    local ir
    ir=$(counted "$1" bench/instr_count_wrapper.py count "$1" "$CALLS")
    echo "$1: $((ir / CALLS)) instructions per call"
}
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(ours official wrapt)
for case in "${cases[@]}"; do
    throttle
    one "$case" >"$TMP/$case.result" &
done
wait
for case in "${cases[@]}"; do
    [ -s "$TMP/$case.result" ] || { echo "$case: no count (see above)" >&2; exit 1; }
    cat "$TMP/$case.result"
done | tee "$TMP/all"
if [ -n "${JSON:-}" ]; then
    awk 'BEGIN {printf "{"} {sub(":", "", $1); printf "%s\"%s\": %s", (NR > 1 ? ", " : ""), $1, $2} END {print "}"}' \
        "$TMP/all" >"$JSON"
fi
