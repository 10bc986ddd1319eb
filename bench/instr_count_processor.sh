#!/usr/bin/env bash
# Instructions per GenAI span (callgrind), bare SDK vs otel-budget's span paths. ~5 minutes.
#   bash bench/instr_count_processor.sh [case ...]     # cases: bare wrapper foreign stated
#   SRC=/path/to/other/src bash bench/instr_count_processor.sh wrapper   # another checkout's code
# Prints "case: N instructions per span"; JSON=path also writes {case: N}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
SRC="${SRC:-$PWD/src}"
SMALL="${SMALL:-300}"
LARGE="${LARGE:-1300}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
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
    echo "$1: $(( (large - small) / (LARGE - SMALL) )) instructions per span"
}
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(bare wrapper foreign stated)
for case in "${cases[@]}"; do one "$case" >"$TMP/$case.result" & done
wait
for case in "${cases[@]}"; do cat "$TMP/$case.result"; done | tee "$TMP/all"
if [ -n "${JSON:-}" ]; then
    awk 'BEGIN {printf "{"} {sub(":", "", $1); printf "%s\"%s\": %s", (NR > 1 ? ", " : ""), $1, $2} END {print "}"}' \
        "$TMP/all" >"$JSON"
fi
