"""Everything a GPU can tell about agentsd, one part per command (each under 8 minutes on one
H100), and the documentation's GPU numbers written from the results.

    python scripts/gpu_suite.py --part sd15 --out gpu-results       # tests, sd15, sd15-compile, ...
    python scripts/gpu_suite.py --part all --tiny --out /tmp/suite  # every part, tiny, on the CPU
    python scripts/gpu_suite.py --estimate                          # each part's time, from FLOPs
    python scripts/gpu_suite.py --report gpu-results                # docs/benchmarks.md and README

The parts, their files and the time estimates: docs/benchmarks.md ("GPU suite").
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
