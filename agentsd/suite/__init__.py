"""The GPU suite: everything a GPU can tell about agentsd, in parts that each fit one
10-minute command (`python scripts/gpu_suite.py --part PART --out DIR`), and the report
that writes the documentation's GPU numbers from the result folders."""

from .common import PART_NAMES, PartContext
from .runner import main, run_parts

__all__ = ["PART_NAMES", "PartContext", "main", "run_parts"]
