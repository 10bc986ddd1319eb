"""``examples/openai_agents_loop.py``: run as a user runs it (a subprocess, offline), and its
``--vary`` mode in this process (importing the Agents SDK again costs seconds)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("agents", reason="openai-agents is not installed (pip install '.[openai-agents]')")

from otel_budget import BudgetInstrumentor  # noqa: E402
from otel_budget.instrumentation.openai_agents import OpenAIAgentsInstrumentor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "openai_agents_loop.py"


def test_the_stuck_agent_is_stopped_by_loop_detection() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.pop("OPENAI_API_KEY", None)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, env=env,
        cwd=ROOT,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "Stopped by loop detection after 4 tool calls and 5 model calls" in out
    assert "terminated by: loop_detected" in out
    assert re.search(r"agent support\s+\$0\.\d+", out)
    assert re.search(r"tool  order_status\s+\$0\.008000  x4", out)


@pytest.fixture
def example() -> Iterator[Any]:
    spec = importlib.util.spec_from_file_location("openai_agents_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    OpenAIAgentsInstrumentor().uninstrument()
    BudgetInstrumentor().uninstrument()


def test_the_agent_with_new_arguments_is_stopped_by_its_budget(
    example: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert example.main(["--vary", "--budget", "0.03"]) == 0
    out = capsys.readouterr().out
    assert "Stopped by its budget" in out
    spent = float(re.search(r"spent \$(\d+\.\d+)", out).group(1))  # type: ignore[union-attr]
    assert 0.02 < spent <= 0.03  # up to the per-run budget, never above it
