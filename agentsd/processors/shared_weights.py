"""Wrapping a processor that holds weights (an IP-Adapter's) without taking them out of the model.

diffusers registers a processor that is an `nn.Module` as the attention module's `processor`
child, so its weights are the model's: in its state dict (`...attn.processor.to_k_ip.0.weight`),
moved by `.to()`, listed by `parameters()`. A plain agentsd processor in its place would drop them
from the model. `SharedWeights` makes the agentsd processor a module whose parameter, buffer and
child tables are the wrapped processor's own: the model sees the same weights under the same
names with agentsd patched in or not, and `unpatch` hands the wrapped processor back untouched.
"""

from __future__ import annotations

from typing import Any

import torch

# The tables of an nn.Module that hold its weights and children.
_TABLES = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


class SharedWeights(torch.nn.Module):
    """Mixin for an agentsd processor class wrapping a processor module: put it first among the
    bases. The wrapped processor is `self.original` (kept out of the module's children, so its
    weights appear once, under their own names); attributes the wrapper lacks (an adapter's sizes)
    are read from it, and those named in `forwarded` (an adapter's `scale`, which diffusers'
    `set_ip_adapter_scale` sets on the processor it finds) are read from and written to it."""

    forwarded: tuple[str, ...] = ("scale",)

    def __init__(self, original: Any = None, *args: Any, **kwargs: Any):
        torch.nn.Module.__init__(self)
        if isinstance(original, torch.nn.Module):
            for table in _TABLES:
                self.__dict__[table] = original.__dict__[table]
        super().__init__(original, *args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "original":  # not a child: its tables are this module's already
            self.__dict__[name] = value
        elif name in self.forwarded and "original" in self.__dict__:
            setattr(self.__dict__["original"], name, value)
        else:
            super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, children
        except AttributeError:
            original = self.__dict__.get("original")
            if original is None or name.startswith("__"):
                raise
            return getattr(original, name)
