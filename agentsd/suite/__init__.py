"""The GPU suite: what a GPU can tell about agentsd, measured in priority order within a time
budget by one command (`python scripts/gpu_suite.py --budget SECONDS --out OUT`, wrapped by
`scripts/gpu_run.sh` for a GPU machine) and packed into a few files, and the report that writes
the documentation's GPU numbers from them."""

from .common import PART_NAMES, PartContext
from .runner import main, run_scenarios
from .scenarios import DEFAULT_ORDER, SCENARIOS

__all__ = ["DEFAULT_ORDER", "PART_NAMES", "SCENARIOS", "PartContext", "main", "run_scenarios"]
