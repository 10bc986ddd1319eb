"""Instructions per GenAI span, bare SDK vs with BudgetSpanProcessor (deterministic).

    bash bench/instr_count_processor.sh     # runs this under valgrind --tool=callgrind

Timing on a shared 2-core VM drifts by tens of percent between runs; callgrind's
instruction counts do not. Each case runs the bench_processor span loop for two sizes and the
difference, divided by the extra spans, is the cost of one span without start-up noise.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_processor as B  # noqa: E402

case, n = sys.argv[1], int(sys.argv[2])
provider, _ = B.make_provider(case != "bare")
B.span_loop(provider, 200, case)  # warm-up: imports, caches
B.span_loop(provider, n, case)
