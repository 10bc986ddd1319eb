#!/usr/bin/env bash
# Instructions per GenAI span (callgrind), bare SDK vs otel-budget's processor. ~1 minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
count() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$PY" bench/instr_count_processor.py "$1" "$2" 2>&1 \
        | awk '/Collected/ {gsub(",", "", $4); print $4}'
}
for mode in bare ours; do
    small=$(count "$mode" 500)
    large=$(count "$mode" 2500)
    echo "$mode: $(( (large - small) / 2000 )) instructions per span"
done
