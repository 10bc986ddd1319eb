#!/usr/bin/env bash
# Instructions per GenAI span (callgrind), bare SDK vs otel-budget's span paths. ~5 minutes.
#   bash bench/instr_count_processor.sh [case ...]     # cases: bare wrapper foreign stated
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
SMALL="${SMALL:-300}"
LARGE="${LARGE:-1300}"
# This checkout's package, not whatever the venv has installed; a fixed hash seed, so that
# dict layouts (and the counts) repeat from run to run.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONHASHSEED=0
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
for case in "${cases[@]}"; do one "$case" & done
wait
