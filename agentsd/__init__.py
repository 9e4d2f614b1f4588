"""agentsd: training-free agent attention for diffusers: Stable Diffusion UNets (1.x, 2.x, XL) and the
SD 3 / 3.5, PixArt and Flux.1 diffusion transformers.

>>> import agentsd
>>> agentsd.patch(pipe)  # doctest: +SKIP

The names below are imported on first use, so `import agentsd` (and the `agentsd` command,
which handles Ctrl-C from its first line) does not import torch and diffusers by itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public name -> the submodule that defines it.
_EXPORTS = {
    "AgentSDConfig": "core.config",
    "PatchStatus": "api.status",
    "community_pipeline": "api.community",
    "current_phase": "api.patch",
    "is_patched": "api.patch",
    "patch": "api.patch",
    "patched": "api.patch",
    "patched_config": "api.patch",
    "status": "api.status",
    "unpatch": "api.patch",
    "unpatched": "api.patch",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and editors; `X as X` marks a re-export
    from .api.community import community_pipeline as community_pipeline
    from .api.patch import current_phase as current_phase
    from .api.patch import is_patched as is_patched
    from .api.patch import patch as patch
    from .api.patch import patched as patched
    from .api.patch import patched_config as patched_config
    from .api.patch import unpatch as unpatch
    from .api.patch import unpatched as unpatched
    from .api.status import PatchStatus as PatchStatus
    from .api.status import status as status
    from .core.config import AgentSDConfig as AgentSDConfig


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
