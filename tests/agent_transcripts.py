"""Tool-call sequences of ordinary agents (none loops) and of stuck ones (each loops).

Each ordinary transcript is the sequence of tool calls (name, arguments as the model sent
them: a JSON string, as the OpenAI and Anthropic APIs carry them) that an agent of a common
kind makes in one run, in the shapes of the providers' and frameworks' tool-calling
examples: a weather/assistant agent, a ReAct research agent, a coding agent that runs the
tests after every edit, a SQL analyst, a support agent, a job poller whose status changes,
a travel planner fanning out over cities, a browsing agent paging through results.
Loop detection with its defaults must never trip on them.

The stuck transcripts are the loops users report: the same search over and over, a cycle
of two calls, a retry storm on a failing tool, and (near-identical) the same query with
its case and spacing shuffled.
"""

from __future__ import annotations

import json
from typing import Any

Transcript = list[tuple[str, str]]


def _call(name: str, **arguments: Any) -> tuple[str, str]:
    return name, json.dumps(arguments)


def _weather_assistant() -> Transcript:
    cities = ["San Francisco", "New York", "Paris", "Tokyo", "San Francisco"]
    calls = [_call("get_weather", location=city, unit="celsius") for city in cities]
    calls.append(_call("get_time", timezone="America/Los_Angeles"))
    calls.append(_call("get_weather", location="San Francisco", unit="fahrenheit"))
    return calls


def _research_agent() -> Transcript:
    calls: Transcript = []
    for i, query in enumerate([
        "otel genai semantic conventions", "gen_ai.usage.input_tokens meaning",
        "opentelemetry span processor on_start", "redis lua atomic reserve",
        "token bucket vs leaky bucket", "llm cost per million tokens gpt-4o-mini",
    ]):  # fmt: skip
        calls.append(_call("web_search", query=query, max_results=5))
        calls.append(_call("fetch_page", url=f"https://example.org/result/{i}/0"))
        calls.append(_call("fetch_page", url=f"https://example.org/result/{i}/1"))
        calls.append(_call("take_note", text=f"finding {i}"))
    calls.append(_call("web_search", query="otel genai semantic conventions", max_results=5))
    return calls


def _coding_agent() -> Transcript:
    calls: Transcript = [_call("list_files", path="src"), _call("read_file", path="src/app.py")]
    for attempt in range(12):  # edit, run the same test command, read the failure, again
        calls.append(_call("edit_file", path="src/app.py", patch=f"@@ fix attempt {attempt}"))
        calls.append(_call("run_command", command="pytest -q tests/test_app.py"))
        calls.append(_call("read_file", path="src/app.py"))
    calls.append(_call("run_command", command="git diff"))
    return calls


def _sql_analyst() -> Transcript:
    calls: Transcript = [_call("list_tables"), _call("describe_table", table="orders")]
    for month in range(1, 13):
        calls.append(_call("run_sql", query=f"SELECT sum(total) FROM orders WHERE month={month}"))
    calls.append(_call("describe_table", table="customers"))
    calls.append(_call("run_sql", query="SELECT count(*) FROM customers"))
    return calls


def _support_agent() -> Transcript:
    calls: Transcript = []
    for ticket in range(8):
        calls.append(_call("lookup_customer", email=f"user{ticket}@example.com"))
        calls.append(_call("get_orders", customer_id=f"c-{ticket}"))
        calls.append(_call("search_kb", query="refund policy"))
        calls.append(_call("reply", ticket_id=f"t-{ticket}", text=f"answer {ticket}"))
    return calls


def _job_poller() -> Transcript:
    # Polls a job; between polls it logs the progress it read (new content each time).
    calls: Transcript = [_call("start_job", spec="nightly-report")]
    for percent in range(0, 101, 10):
        calls.append(_call("get_job_status", job_id="job-42"))
        calls.append(_call("log_progress", percent=percent))
    calls.append(_call("download_result", job_id="job-42"))
    return calls


def _travel_planner() -> Transcript:
    calls: Transcript = []
    for city in ["Lisbon", "Porto", "Madrid", "Seville", "Granada", "Valencia", "Barcelona"]:
        calls.append(_call("search_flights", origin="LHR", destination=city, date="2027-05-01"))
        calls.append(_call("search_hotels", city=city, nights=2))
        calls.append(_call("get_weather", location=city, unit="celsius"))
    calls.append(_call("book", itinerary="LIS-OPO-MAD"))
    return calls


def _browsing_agent() -> Transcript:
    calls: Transcript = [_call("open_url", url="https://shop.example/search?q=laptop")]
    for page in range(2, 12):
        calls.append(_call("scroll", direction="down"))
        calls.append(_call("click", selector=f"a.page-{page}"))
    calls.append(_call("extract", selector=".price"))
    return calls


ORDINARY: dict[str, Transcript] = {
    "weather_assistant": _weather_assistant(),
    "research_agent": _research_agent(),
    "coding_agent": _coding_agent(),
    "sql_analyst": _sql_analyst(),
    "support_agent": _support_agent(),
    "job_poller": _job_poller(),
    "travel_planner": _travel_planner(),
    "browsing_agent": _browsing_agent(),
}


def _stuck_search() -> Transcript:
    return [_call("web_search", query="current price of BTC", max_results=5)] * 40


def _two_call_cycle() -> Transcript:
    return [_call("read_file", path="config.yaml"), _call("run_command", command="make")] * 20


def _retry_storm() -> Transcript:
    # The model "retries" a failing tool, reformatting the JSON each time (same arguments).
    calls: Transcript = []
    for i in range(40):
        spaced = " " * (i % 3)
        calls.append(("charge_card", f'{{"amount":{spaced}42.0, "card":"tok_1"}}'))
    return calls


def _shuffled_case() -> Transcript:
    # Never twice the same string: one letter upper-cased in turn, the spacing growing.
    text = "weather in paris"
    calls: Transcript = []
    for i in range(40):
        at = i % len(text)
        query = text[:at] + text[at].upper() + text[at + 1 :] + " " * (i // len(text))
        calls.append(_call("web_search", query=query))
    return calls


STUCK: dict[str, Transcript] = {
    "stuck_search": _stuck_search(),
    "two_call_cycle": _two_call_cycle(),
    "retry_storm": _retry_storm(),
}
# Loops only near-identical matching sees.
STUCK_NEAR: dict[str, Transcript] = {"shuffled_case": _shuffled_case()}
