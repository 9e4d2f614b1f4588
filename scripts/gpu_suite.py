"""What a GPU can tell about agentsd, in one command within a time budget, packed into a few
files, and the documentation's GPU numbers written from them.

    python scripts/gpu_suite.py --budget 480 --out OUT           # every scenario that fits, in priority order
    python scripts/gpu_suite.py --scenarios sd15-1024 --out OUT  # some of them, in this order
    python scripts/gpu_suite.py --tiny --out /tmp/suite          # the same, tiny, on the CPU (CI)
    python scripts/gpu_suite.py --estimate                       # each scenario's prior estimate
    python scripts/gpu_suite.py --report OUT                     # unpack into docs/bench/gpu-<device>/, write the docs

On the project's GPU machine the one command is `bash scripts/gpu_run.sh $OUT` (it installs
from wheelhouse/ first). The scenarios, the budget and OUT's files: docs/benchmarks.md ("The GPU suite").
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The checkout's agentsd, even where another copy is installed: the one whose tests run and
# whose commit every row records.
sys.path.insert(0, str(ROOT))

from agentsd.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(root=ROOT))
