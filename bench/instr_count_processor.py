"""Instructions per GenAI span, bare SDK vs with BudgetSpanProcessor (deterministic).

    bash bench/instr_count_processor.sh     # runs this under valgrind --tool=callgrind

Timing on a shared 2-core VM drifts by tens of percent between runs; callgrind's
instruction counts do not. Each case runs the bench_processor span loop for two sizes and the
difference, divided by the extra spans, is the cost of one span without start-up noise.
"""

import sys
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_budget import BudgetSpanProcessor

sys.path.insert(0, str(Path(__file__).parent))
import bench_processor as B  # noqa: E402

case, n = sys.argv[1], int(sys.argv[2])
# The batch processor's worker exports only when a batch is full (no timer): how often it
# wakes then depends on the spans alone, not on how long the run takes under valgrind on a
# loaded machine (a timer's wake-ups varied the counts by 10-45k per span between runs).
provider = TracerProvider()
if case != "bare":
    provider.add_span_processor(BudgetSpanProcessor(max_usd=1_000_000))
provider.add_span_processor(
    BatchSpanProcessor(B.NoopExporter(), max_queue_size=1 << 16, schedule_delay_millis=3_600_000)
)
B.span_loop(provider, 200, case)  # warm-up: imports, caches
B.span_loop(provider, n, case)
