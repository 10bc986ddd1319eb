"""Instructions per GenAI span, bare SDK vs with BudgetSpanProcessor (deterministic).

    bash bench/instr_count_processor.sh     # runs this under valgrind --tool=callgrind
    WITHOUT=ledger,report bash bench/instr_count_processor.sh wrapper   # what those parts cost

Timing on a shared 2-core VM drifts by tens of percent between runs; callgrind's
instruction counts do not. Each case runs the bench_processor span loop for two sizes and the
difference, divided by the extra spans, is the cost of one span without start-up noise.

``floor``: the bare span with our two cost attributes and a span processor that does
nothing, the least a processor that records a span's cost can add.

``WITHOUT`` (comma-separated) measures what parts of the path cost by taking them out, for a
count only (the budget no longer holds): ``ledger`` (the storage's reserve and commit answer
a constant), ``report`` (the run's cost breakdown is not added to), ``metrics`` (no cost
counter), ``thresholds`` (no soft-limit check).
"""

import os
import sys
from pathlib import Path

from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_budget import BudgetSpanProcessor
from otel_budget import engine as engine_module
from otel_budget.report import TraceStats

sys.path.insert(0, str(Path(__file__).parent))
import bench_processor as B  # noqa: E402

case, n = sys.argv[1], int(sys.argv[2])


def take_out(processor: BudgetSpanProcessor, parts: set[str]) -> None:
    """Replace each named part of the span path with a constant (see ``WITHOUT``)."""
    unknown = parts - {"ledger", "report", "metrics", "thresholds"}
    if unknown:
        raise SystemExit(f"WITHOUT: unknown parts {sorted(unknown)}")
    runtime = processor.runtime
    if "ledger" in parts:
        storage = runtime.storage
        reserved = storage.reserve_up_to(-1, (), 500_000, 500_000)
        committed = storage.commit(-1, 288_000)
        storage.reserve_up_to = lambda *args, **kw: reserved
        storage.commit = lambda *args, **kw: committed
    if "report" in parts:
        TraceStats.add_llm = lambda *args, **kw: None
    if "metrics" in parts:
        runtime.engine.metrics = None
    if "thresholds" in parts:
        engine_module.threshold_due = lambda charge, usages: False


class DoNothing(SpanProcessor):
    """The ``floor`` case's processor: what being a span processor costs in the SDK."""


provider = TracerProvider()
if case == "floor":
    # The least any span processor adds: the SDK calling a processor that does nothing, on
    # a span carrying our two cost attributes (the projection at start, the cost at end).
    provider.add_span_processor(DoNothing())
elif case != "bare":
    processor = BudgetSpanProcessor(max_usd=1_000_000)
    provider.add_span_processor(processor)
    take_out(processor, set(filter(None, os.environ.get("WITHOUT", "").split(","))))
# The batch processor's worker exports only when a batch is full (no timer): how often it
# wakes then depends on the spans alone, not on how long the run takes under valgrind on a
# loaded machine (a timer's wake-ups varied the counts by 10-45k per span between runs).
provider.add_span_processor(
    BatchSpanProcessor(B.NoopExporter(), max_queue_size=1 << 16, schedule_delay_millis=3_600_000)
)
loop_case = "stated" if case == "floor" else case  # (the stated case's attributes)
B.span_loop(provider, 200, loop_case)  # warm-up: imports, caches
B.span_loop(provider, n, loop_case)
