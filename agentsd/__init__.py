"""agentsd: training-free agent attention for diffusers Stable Diffusion UNets.

>>> import agentsd
>>> agentsd.patch(pipe)  # doctest: +SKIP
"""

from .community import community_pipeline
from .config import AgentSDConfig
from .patch import current_phase, is_patched, patch, patched, patched_config, unpatch, unpatched
from .status import PatchStatus, status

__version__ = "0.1.0"

__all__ = [
    "AgentSDConfig",
    "PatchStatus",
    "__version__",
    "community_pipeline",
    "current_phase",
    "is_patched",
    "patch",
    "patched",
    "patched_config",
    "status",
    "unpatch",
    "unpatched",
]
