# Sourced by the instr_count_*.sh scripts (from the repository's root): count what a Python
# process does after it says "ready", under callgrind, without its start-up.
#   total=$(counted TAG script.py args...)
# Sets PY (the venv's python, or $PYTHON), SRC (this checkout's src, or $SRC: another
# checkout's code) and TMP (a new directory, removed at exit; never one inherited).
PY="${PYTHON:-.venv/bin/python}"
SRC="${SRC:-$PWD/src}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# Counts run one at a time unless JOBS says otherwise: with two counting processes at once,
# one of the two came out ~40k instructions per span higher in 4 of 7 pairs on the 2-core
# development machine (never in a count run alone), so side by side means one after the other.
JOBS="${JOBS:-1}"
# Call before starting a count in the background: waits until fewer than JOBS are running.
throttle() {
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
}
# The process sets up with counting off, prints "ready" and blocks on stdin; counting is then
# switched on and a line written, and the process runs its measured work and exits. Prints
# the instructions counted (the process's stderr goes to the caller's, should it die first).
counted() {
    local tag="$1" out fifo pid fd
    shift
    out="$TMP/$tag.out" fifo="$TMP/$tag.in"
    mkfifo "$fifo"
    PYTHONHASHSEED=0 PYTHONPATH="$SRC" valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$out" "$PY" "$@" <"$fifo" >"$TMP/$tag.log" 2>"$TMP/$tag.err" &
    pid=$!
    exec {fd}>"$fifo"
    until grep -q ready "$TMP/$tag.log" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { cat "$TMP/$tag.err" >&2; return 1; }
        sleep 1
    done
    callgrind_control -i on "$pid" >/dev/null 2>&1
    echo >&"$fd"
    exec {fd}>&-
    wait "$pid" || true
    grep -E "^(summary|totals):" "$out" | head -1 | awk '{print $2}'
}
