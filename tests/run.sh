#!/usr/bin/env bash
# The test command of the README: installs what the suite needs, then runs it.
#   bash tests/run.sh            # the whole suite
#   bash tests/run.sh -k ledger  # extra arguments go to pytest
#   SKIP_LINT=1 bash tests/run.sh   # without ruff and mypy
set -euo pipefail
cd "$(dirname "$0")/.."

# The integration tests run real servers from Debian's packages (redis-server, prometheus).
# Install them when missing and we may; without them those tests skip and say why.
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
              --no-install-recommends "${need[@]}"; } >/dev/null 2>&1 \
            || echo "tests/run.sh: WARNING: could not install ${need[*]}; their tests will skip" >&2
    else
        echo "tests/run.sh: ${need[*]} not installed (needs root/apt); their tests will skip" >&2
    fi
fi

# CrewAI needs openai<3, the suite runs openai 3: tests/test_crewai.py also runs in a venv of
# its own, the pinned tests/crewai-requirements.txt without otel-budget (the tests import it
# from src/), kept between runs under ~/.cache and keyed by that file's hash. For the whole
# suite it is built and run in the background, beside the main install and suite (on the other
# core); the main suite's test_crewai_suite_in_its_own_venv waits for that result. Building it
# (335 MB) is opt-in, OTEL_BUDGET_TEST_CREWAI=1: on a 2-core machine it pushes the whole run
# past ten minutes. A venv built before is used whenever it is there; without one, that test
# skips and says how to run it (and fails when the build was asked for and did not work).
crewai_key="$(sha256sum tests/crewai-requirements.txt | cut -c1-16)"
CREWAI_VENV="${CREWAI_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/otel-budget/venv-crewai-$crewai_key}"
crewai_venv() {  # builds the venv if needed; its log on stdout
    [ -f "$CREWAI_VENV/.complete" ] && return 0
    rm -rf "$CREWAI_VENV"
    python3 -m venv "$CREWAI_VENV" \
        && "$CREWAI_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
               --no-deps -r tests/crewai-requirements.txt 2>&1 | { grep -v "is ignored" || true; } \
        && touch "$CREWAI_VENV/.complete"
    [ -f "$CREWAI_VENV/.complete" ]
}
if [ "${OTEL_BUDGET_TEST_CREWAI:-0}" != 1 ] && [ ! -f "$CREWAI_VENV/.complete" ]; then
    echo "tests/run.sh: the CrewAI suite is not run (its venv is not built): OTEL_BUDGET_TEST_CREWAI=1 builds it" >&2
elif [ "$#" -eq 0 ] || [ "$*" = "-q" ]; then
    OTEL_BUDGET_TEST_CREWAI_RESULT="$(mktemp -d)"
    export OTEL_BUDGET_TEST_CREWAI_RESULT
    ( if crewai_venv >"$OTEL_BUDGET_TEST_CREWAI_RESULT/log"; then
          rc=0
          PYTHONPATH="$PWD/src:$PWD" "$CREWAI_VENV/bin/python" -m pytest -q -p no:cacheprovider \
              -W ignore::DeprecationWarning tests/test_crewai.py \
              >>"$OTEL_BUDGET_TEST_CREWAI_RESULT/log" 2>&1 || rc=$?
          echo "$rc" >"$OTEL_BUDGET_TEST_CREWAI_RESULT/rc"
      else
          echo unbuilt >"$OTEL_BUDGET_TEST_CREWAI_RESULT/rc"
      fi ) </dev/null &
elif crewai_venv >/dev/null; then
    export OTEL_BUDGET_TEST_CREWAI_PYTHON="$CREWAI_VENV/bin/python"
else
    echo "tests/run.sh: WARNING: the CrewAI test venv could not be built; its tests will not run" >&2
fi

VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
LOG="$(mktemp)"
# The optional extras resolve beside [test] without changing any of its versions: one install.
if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile -e '.[test,langchain,mcp,openai-agents]' >"$LOG" 2>&1; then
    grep -v "is ignored" "$LOG" >&2
    echo "tests/run.sh: installing the test dependencies failed" >&2
    exit 1
fi
rm -f "$LOG"

# litellm cannot be resolved by pip today (see tests/litellm-pin.txt): a hash-pinned wheel
# without its dependencies, then those dependencies. If that fails its tests are skipped,
# loudly.
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('litellm') is None)"; then
    if ! { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
               -r tests/litellm-requirements.txt >"$LOG" 2>&1 \
           && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
               --require-hashes -r tests/litellm-pin.txt >>"$LOG" 2>&1; }; then
        grep -v "is ignored" "$LOG" | tail -5 >&2
        echo "tests/run.sh: WARNING: litellm could not be installed; its tests will be skipped" >&2
    fi
    rm -f "$LOG"
fi

# Lint and types first (seconds): SKIP_LINT=1 skips them.
if [ "${SKIP_LINT:-0}" != 1 ]; then
    "$VENV/bin/ruff" check --quiet src tests bench examples
    "$VENV/bin/mypy" --python-executable "$VENV/bin/python"
fi

# On every core, a test file per worker at a time (module fixtures, such as the servers a
# file starts, are set up once). TEST_WORKERS=0 runs it in this process.
exec "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-auto}" --dist loadfile "$@"
