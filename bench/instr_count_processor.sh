#!/usr/bin/env bash
# Instructions per GenAI span (callgrind), bare SDK vs otel-budget's span paths. ~8 minutes
# (JOBS=2: two counts at a time, faster and less exact; see bench/callgrind_ready.sh).
#   bash bench/instr_count_processor.sh [case ...]     # cases: bare wrapper foreign stated floor
#   SRC=/path/to/other/src bash bench/instr_count_processor.sh wrapper   # another checkout's code
#   WITHOUT=ledger,report bash bench/instr_count_processor.sh wrapper   # those parts' share
# Prints "case: N instructions per span"; JSON=path also writes {case: N}.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL="${SMALL:-300}"
LARGE="${LARGE:-1300}"
# shellcheck source=bench/callgrind_ready.sh
. bench/callgrind_ready.sh
# This checkout's package (or SRC's), not whatever the venv has installed; a fixed hash
# seed, so that dict layouts (and the counts) repeat from run to run.
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" PYTHONHASHSEED=0
count() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$PY" bench/instr_count_processor.py "$1" "$2" 2>&1 \
        | awk '/Collected/ {gsub(",", "", $4); print $4}'
}
one() {
    local small large
    small=$(count "$1" "$SMALL")
    large=$(count "$1" "$LARGE")
    local label="$1"
    if [ "$1" != bare ] && [ -n "${WITHOUT:-}" ]; then label="$1-without-$WITHOUT"; fi
    echo "$label: $(( (large - small) / (LARGE - SMALL) )) instructions per span"
}
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(bare floor wrapper foreign stated)
for case in "${cases[@]}"; do
    throttle
    one "$case" >"$TMP/$case.result" &
done
wait
for case in "${cases[@]}"; do cat "$TMP/$case.result"; done | tee "$TMP/all"
if [ -n "${JSON:-}" ]; then
    awk 'BEGIN {printf "{"} {sub(":", "", $1); printf "%s\"%s\": %s", (NR > 1 ? ", " : ""), $1, $2} END {print "}"}' \
        "$TMP/all" >"$JSON"
fi
