#!/usr/bin/env bash
# A separate venv for the benchmarks: the official GenAI OpenAI instrumentation registers the
# entry point name "openai", which must not load into the test suite's zero-code runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BENCH_VENV:-/work/bench-venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet -e '.[openai]' opentelemetry-instrumentation-genai-openai
echo "benchmarks: $VENV/bin/python bench/bench_processor.py | bench_instrumentation.py"
