"""``examples/langgraph_agent.py`` runs offline and is stopped: by loop detection, or (with
``--budget``) by its budget. Run as a user would, in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("langgraph", reason="the langchain extra is not installed")
pytest.importorskip("langchain_openai", reason="the langchain extra is not installed")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "langgraph_agent.py"


def run_example(*args: str) -> str:
    env = dict(os.environ)
    src = str(EXAMPLE.parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "OTEL_BUDGET_MAX_USD"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _usd(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, text
    return float(found.group(1))


@pytest.mark.parametrize(
    ("args", "reason"), [((), "loop_detected"), (("--budget",), "limit")], ids=["loop", "budget"]
)
def test_the_agent_loop_is_stopped(args: tuple[str, ...], reason: str) -> None:
    out = run_example(*args)
    assert f"stopped: {reason}:" in out
    # Per node (agent), model and tool; the model spend is what the provider billed (once).
    assert re.search(r"agent tools\s+\$0\.080000\s+x4", out), out
    assert re.search(r"tool  search_flights\s+\$0\.080000\s+x4", out), out
    model = _usd(r"model gpt-4o-mini\s+\$([0-9.]+)", out)
    assert model == _usd(r"provider bill: \$([0-9.]+)", out) > 0
