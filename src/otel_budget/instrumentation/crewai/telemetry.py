"""Keep CrewAI from phoning home, without touching otel-budget's own OpenTelemetry.

    from otel_budget.instrumentation.crewai.telemetry import quiet_crewai

    quiet_crewai()          # done by CrewAIInstrumentor().instrument() and protect_crew()

CrewAI sends anonymous usage telemetry to its servers with a ``TracerProvider`` of its own,
uploads execution traces to its platform when tracing is on, and looks up its latest version
on PyPI for the console. Each is switched off with CrewAI's own variables, set here unless
the application already chose a value (a ``CREWAI_TRACING_ENABLED=true`` the user set stays).

``OTEL_SDK_DISABLED``, which CrewAI also reads as an opt-out, is deliberately not used: it
turns the whole OpenTelemetry SDK off, the application's spans (and otel-budget's root-span
breakdown) with it. Enforcement does not depend on spans, but the trace is the point.
"""

from __future__ import annotations

import os

#: CrewAI's variables and the value that keeps each feature off the network.
QUIET_ENV: dict[str, str] = {
    "CREWAI_DISABLE_TELEMETRY": "true",  # anonymous usage telemetry (crewai_core.telemetry)
    "CREWAI_DISABLE_TRACKING": "true",  # the same switch, older name
    "CREWAI_TRACING_ENABLED": "false",  # execution traces uploaded to the CrewAI platform
    "CREWAI_DISABLE_VERSION_CHECK": "true",  # the console's latest-version lookup
}


def quiet_crewai() -> dict[str, str]:
    """Set each of ``QUIET_ENV`` the environment does not set yet; returns what was set."""
    applied: dict[str, str] = {}
    for name, value in QUIET_ENV.items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    return applied


__all__ = ["QUIET_ENV", "quiet_crewai"]
