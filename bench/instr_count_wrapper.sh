#!/usr/bin/env bash
# Instructions per call of each instrumentation's wrapper work (callgrind), side by side.
#   bash bench/instr_count_wrapper.sh [case ...]   # cases: ours official wrapt request response
#   SRC=/path/to/other/src bash bench/instr_count_wrapper.sh ours   # another checkout's code
# Prints "case: N instructions per call"; JSON=path also writes {case: N}. ~2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
SRC="${SRC:-$PWD/src}"
CALLS="${CALLS:-200}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
one() {
    local out="$TMP/$1.out" fifo="$TMP/$1.in" pid
    mkfifo "$fifo"
    PYTHONHASHSEED=0 PYTHONPATH="$SRC" valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$out" "$PY" bench/instr_count_wrapper.py count "$1" "$CALLS" \
        <"$fifo" >"$TMP/$1.log" 2>"$TMP/$1.err" &
    pid=$!
    exec {fd}>"$fifo"
    until grep -q ready "$TMP/$1.log" 2>/dev/null; do sleep 1; done
    callgrind_control -i on "$pid" >/dev/null 2>&1
    echo >&"$fd"
    exec {fd}>&-
    wait "$pid" || true
    local ir
    ir=$(grep -E "^(summary|totals):" "$out" | head -1 | awk '{print $2}')
    echo "$1: $((ir / CALLS)) instructions per call"
}
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(ours official wrapt)
for case in "${cases[@]}"; do one "$case" >"$TMP/$case.result" & done
wait
for case in "${cases[@]}"; do cat "$TMP/$case.result"; done | tee "$TMP/all"
if [ -n "${JSON:-}" ]; then
    awk 'BEGIN {printf "{"} {sub(":", "", $1); printf "%s\"%s\": %s", (NR > 1 ? ", " : ""), $1, $2} END {print "}"}' \
        "$TMP/all" >"$JSON"
fi
