#!/usr/bin/env bash
# The README's first command: the runaway-agent demo, on an embedded fake LLM server.
# Installs what it needs (a local .venv with otel-budget[openai]) on a fresh machine.
#   bash examples/demo.sh                       # defaults: $0.01 budget, gpt-4o-mini
#   bash examples/demo.sh --budget 0.05 --spans console
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
LOG="$(mktemp)"
if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[openai,otlp]' >"$LOG" 2>&1; then
    grep -v "is ignored" "$LOG" >&2
    echo "examples/demo.sh: installing otel-budget failed" >&2
    exit 1
fi
rm -f "$LOG"
exec "$VENV/bin/python" -m otel_budget.demo "$@"
