"""What differs between the diffusers releases agentsd supports (README, "Tested stacks").

Only what agentsd's own code needs: the rest of the library uses APIs that every supported
release has.
"""

from __future__ import annotations

import re
from typing import Any

import diffusers
import torch

# `from_pretrained(dtype=...)` since diffusers 0.40; before it only `torch_dtype=` (which 0.40
# and later still take, with a deprecation warning).
DTYPE_KEYWORD_SINCE = (0, 40)


def diffusers_version() -> tuple[int, int]:
    """The installed diffusers release as (major, minor); a dev or rc build counts as its release."""
    match = re.match(r"(\d+)\.(\d+)", diffusers.__version__)
    if match is None:
        raise RuntimeError(f"cannot read the diffusers version {diffusers.__version__!r}: reinstall diffusers.")
    return int(match.group(1)), int(match.group(2))


def dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """The `from_pretrained` keyword that loads the weights in `dtype`, as this diffusers names it."""
    return {"dtype" if diffusers_version() >= DTYPE_KEYWORD_SINCE else "torch_dtype": dtype}
