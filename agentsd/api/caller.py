"""Which pipeline a model call comes from, so that the phase schedule reads that pipeline's scheduler.

One patched model may serve several pipelines at once: the one it was patched through, and
every pipeline made from it (`Pipeline.from_pipe(pipe, scheduler=...)`, `Pipeline(**pipe.components)`,
a deep copy), each with its own scheduler, each perhaps in its own thread. A model call does not
say which pipeline made it, but that pipeline's `__call__` is on the calling thread's stack: the
innermost `DiffusionPipeline` there that holds the model is the caller. Reading it costs a walk
over the calling thread's frames (tens of them), once per model call, in the forward pre-hook.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def calling_pipeline(model: torch.nn.Module) -> Any | None:
    """The innermost pipeline on this thread's stack that holds `model` (directly, or compiled
    with `torch.compile`) and has a scheduler; None when the model is called outside such a
    pipeline (a hand-written loop, a bare model)."""
    from diffusers import DiffusionPipeline

    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if isinstance(owner, DiffusionPipeline) and _holds(owner, model) and hasattr(owner, "scheduler"):
                return owner
        frame = frame.f_back
    return None


def _holds(pipe: Any, model: torch.nn.Module) -> bool:
    return any(
        value is model or getattr(value, "_orig_mod", None) is model
        for value in vars(pipe).values()
        if isinstance(value, torch.nn.Module)
    )
