#!/usr/bin/env bash
# Instructions per real openai call over loopback (callgrind), bare and under each
# instrumentation, side by side; overheads and ours / official per kind.
#   bash bench/instr_count_sdk.sh [kind ...]       # kinds: sync async stream (default: all)
#   CASES="bare ours" SRC=/other/src bash bench/instr_count_sdk.sh sync   # another checkout
# Prints "kind case: N instructions per call", then each kind's overheads; JSON=path also
# writes {kind: {case: N, ...}}. ~4 minutes per kind (JOBS=2: two
# cases at a time; see bench/callgrind_ready.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
CALLS="${CALLS:-150}"
read -r -a CASE_LIST <<<"${CASES:-bare ours official wrapt}"
# shellcheck source=bench/callgrind_ready.sh
. bench/callgrind_ready.sh
one() {  # kind case
    local ir
    ir=$(counted "$1-$2" bench/instr_count_sdk.py "$2" "$1" "$CALLS")
    echo "$1 $2: $((ir / CALLS)) instructions per call"
}
kinds=("$@")
[ ${#kinds[@]} -eq 0 ] && kinds=(sync async stream)
for kind in "${kinds[@]}"; do
    for case in "${CASE_LIST[@]}"; do
        throttle
        one "$kind" "$case" >"$TMP/$kind.$case.result" &
    done
    wait
done
for kind in "${kinds[@]}"; do
    for case in "${CASE_LIST[@]}"; do
        [ -s "$TMP/$kind.$case.result" ] || { echo "$kind $case: no count (see above)" >&2; exit 1; }
        cat "$TMP/$kind.$case.result"
    done
done | tee "$TMP/all"
awk '
    { sub(":", "", $2); n[$1, $2] = $3; kinds[$1] = 1 }
    END {
        for (k in kinds) {
            if (!((k, "bare") in n)) continue
            line = k " overhead:"
            for (c in n) { split(c, p, SUBSEP); if (p[1] == k && p[2] != "bare") line = line " " p[2] " +" n[k, p[2]] - n[k, "bare"] }
            if ((k, "ours") in n && (k, "official") in n)
                line = line sprintf("; ours / official %.2f", (n[k, "ours"] - n[k, "bare"]) / (n[k, "official"] - n[k, "bare"]))
            print line
        }
    }' "$TMP/all"
if [ -n "${JSON:-}" ]; then
    awk 'BEGIN {printf "{"} { sub(":", "", $2); if ($1 != k) { printf "%s\"%s\": {", (k == "" ? "" : "}, "), $1; k = $1; f = 0 } printf "%s\"%s\": %s", (f++ ? ", " : ""), $2, $3 } END {print "}}"}' \
        "$TMP/all" >"$JSON"
fi
