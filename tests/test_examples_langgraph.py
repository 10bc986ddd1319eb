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


def start_example(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    src = str(EXAMPLE.parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "OTEL_BUDGET_MAX_USD"):
        env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, str(EXAMPLE), *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def outputs() -> dict[str, str]:
    """Both runs, started together (each spends seconds importing LangChain)."""
    runs = {"loop": start_example(), "budget": start_example("--budget")}
    out = {}
    for name, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stdout + stderr
        out[name] = stdout
    return out


def _usd(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, text
    return float(found.group(1))


@pytest.mark.parametrize(("mode", "reason"), [("loop", "loop_detected"), ("budget", "limit")])
def test_the_agent_loop_is_stopped(outputs: dict[str, str], mode: str, reason: str) -> None:
    out = outputs[mode]
    assert f"stopped: {reason}:" in out
    # Per node (agent), model and tool; the model spend is what the provider billed (once).
    assert re.search(r"agent tools\s+\$0\.080000\s+x4", out), out
    assert re.search(r"tool  search_flights\s+\$0\.080000\s+x4", out), out
    model = _usd(r"model gpt-4o-mini\s+\$([0-9.]+)", out)
    assert model == _usd(r"provider bill: \$([0-9.]+)", out) > 0
