"""``examples/mcp_tool_loop.py`` run as a user runs it: a subprocess (which starts its own MCP
server subprocess over stdio), offline, in both modes, with every socket connection of both
processes audited: nothing may dial out beyond the loopback interface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the mcp extra is not installed (pip install '.[mcp]')")
pytest.importorskip("openai", reason="the openai extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mcp_tool_loop.py"

# Loaded by every Python process started with this PYTHONPATH (the example, and the MCP
# server it spawns): records, and blocks before it happens, each connection or name lookup
# that is not local.
AUDIT = textwrap.dedent("""
    import os, socket, sys

    _LOCAL = ("127.", "::1", "localhost")
    _LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "net.log")

    def _audit(event, args):
        if event == "socket.connect":
            address = args[1]
            if not isinstance(address, tuple):
                return  # a Unix socket
            host = str(address[0])
        elif event == "socket.getaddrinfo":
            host = str(args[0])
        else:
            return
        if not host.startswith(_LOCAL):
            with open(_LOG, "a") as log:
                log.write(f"{os.getpid()} {event} {host}\\n")
            raise PermissionError(f"blocked by the test: {event} {host}")  # before it happens

    sys.addaudithook(_audit)
""")


def run_example(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """The example's result, and the non-local connections its processes attempted."""
    site = tmp_path / ("site" + "".join(args).replace("-", "_"))
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    net_log = site / "net.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")])}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=120,
        env=env, cwd=str(tmp_path),
    )  # fmt: skip
    return done, net_log.read_text() if net_log.exists() else ""


def outcome_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_example_is_stopped_by_loop_detection_then_by_its_budget(tmp_path: Path) -> None:
    with ThreadPoolExecutor(2) as pool:  # two independent runs, side by side
        loop_run = pool.submit(run_example, tmp_path)
        budget_run = pool.submit(run_example, tmp_path, "--json", "--stop", "budget")
        (loop_done, loop_net), (budget_done, budget_net) = loop_run.result(), budget_run.result()

    # As a person reads it: the loop, the stop, what the server ran, the report.
    assert loop_done.returncode == 0, loop_done.stdout + loop_done.stderr
    out = loop_done.stdout
    assert out.count("the model asks for search({'query': 'cheapest flight to Lisbon'})") == 4
    assert "STOPPED by loop detection" in out
    assert "the MCP server ran search 3 times" in out  # the 4th call never reached it
    assert "terminated by: loop_detected" in out and "loops detected: 1" in out
    assert "(4 LLM calls, 3 tool calls, 1 refused)" in out
    assert "agent travel-agent" in out and "tool  search                           $0.006000  x3" in out

    stopped = outcome_of(budget_done)
    assert stopped["stopped_by"] == "limit"
    report = stopped["report"]
    assert report["terminated_by"] == "budget_exceeded"
    assert report["total_usd"] <= 0.02
    assert report["tool_calls"] == stopped["tool_executions"] >= 5  # distinct searches: no loop
    assert report["loops"] == 0
    # The model's cost in the ledger is the provider's bill; spend is per agent too.
    assert report["llm_usd"] == pytest.approx(stopped["llm_billed_usd"], abs=1e-9)
    assert report["by_agent"]["travel-agent"]["usd"] == pytest.approx(report["total_usd"])

    assert loop_net == "" and budget_net == "", loop_net + budget_net  # loopback only
