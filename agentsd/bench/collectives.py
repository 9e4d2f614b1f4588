"""Counting what a rank sends through torch.distributed, and the two CPU shims diffusers' context
parallelism needs there.

`CollectiveCounter` wraps the collectives of `torch.distributed` and of its functional
collectives (`torch.distributed._functional_collectives`, what diffusers' Ulysses and ring call)
for the time of a `with` block, and adds up the elements (and bytes) of each call's input, per
attention layer the call was made in (found through forward hooks on the model's attention
modules) or outside any (the output gather at the model's end). The count is what this rank
hands to the collectives: an all-to-all's whole input (1/P of which stays on the rank), an
all-gather's own part, an all-reduce's tensor; a collective that calls another (torch's
deprecated `all_gather_tensor` calls `all_gather_single`, and so does `all_gather_into_tensor`) is
counted once.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# The collectives wrapped: (module, name, position and keyword of the input that is sent).
COLLECTIVES = (
    (dist, "all_gather", 1, "tensor"),
    (dist, "all_gather_into_tensor", 1, "input_tensor"),
    (dist, "all_gather_single", 1, "input_tensor"),
    (dist, "all_to_all_single", 1, "input"),
    (dist, "all_to_all", 1, "input_tensor_list"),
    (dist, "all_reduce", 0, "tensor"),
    (dist, "reduce_scatter_tensor", 1, "input"),
    (funcol, "all_gather_tensor", 0, "self"),
    (funcol, "all_gather_single", 0, "self"),
    (funcol, "all_to_all_single", 0, "self"),
    (funcol, "all_reduce", 0, "self"),
    (funcol, "reduce_scatter_tensor", 0, "self"),
    (funcol, "permute_tensor", 0, "self"),
)
OUTSIDE = ""  # the key of what was sent outside the attention layers


class CollectiveCounter:
    """Elements and bytes this rank sends through the collectives while `counting` is entered,
    keyed by the attention layer (its module name) that sent them, or `OUTSIDE`.

    Args:
        model: the transformer; its attention modules (those of `model.attn_processors`) name the layers.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.elements: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._inside: list[str] = []
        self._calling = False

    @contextlib.contextmanager
    def counting(self) -> Iterator[CollectiveCounter]:
        """Count from a clean slate inside the block; everything is restored after it."""
        self.elements.clear()
        self.bytes.clear()
        saved = [(module, name, getattr(module, name)) for module, name, _, _ in COLLECTIVES if hasattr(module, name)]
        handles = []
        for layer in {name.rsplit(".", 1)[0] for name in self.model.attn_processors}:
            module = self.model.get_submodule(layer)
            handles.append(module.register_forward_pre_hook(lambda m, a, layer=layer: self._enter(layer)))
            handles.append(module.register_forward_hook(lambda m, a, o: self._leave()))
        try:
            for module, name, position, keyword in COLLECTIVES:
                if hasattr(module, name):
                    setattr(module, name, self._wrap(getattr(module, name), position, keyword))
            yield self
        finally:
            for module, name, original in saved:
                setattr(module, name, original)
            for handle in handles:
                handle.remove()
            self._inside.clear()

    def _enter(self, layer: str) -> None:
        self._inside.append(layer)

    def _leave(self) -> None:  # returns None: a forward hook's result would replace the module's output
        self._inside.pop()

    def _wrap(self, collective: Any, position: int, keyword: str) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._calling:  # a collective called by another (a deprecated name calling its successor)
                return collective(*args, **kwargs)
            sent = args[position] if len(args) > position else kwargs[keyword]
            tensors = sent if isinstance(sent, (list, tuple)) else [sent]
            layer = self._inside[-1] if self._inside else OUTSIDE
            self.elements[layer] += sum(t.numel() for t in tensors)
            self.bytes[layer] += sum(t.numel() * t.element_size() for t in tensors)
            self._calling = True
            try:
                return collective(*args, **kwargs)
            finally:
                self._calling = False

        return counted

    def layers(self) -> dict[str, int]:
        """Elements per attention layer that sent any."""
        return {layer: count for layer, count in self.elements.items() if layer != OUTSIDE and count}


def _forward_op_with_lse(original: Any) -> Any:
    """diffusers' native forward op, returning the log-sum-exp when asked (ring attention asks):
    the CPU's flash attention kernel gives it, (B, H, S) turned into diffusers' (B, S, H)."""

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):  # fmt: skip
        if not return_lse:
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                            _save_ctx=_save_ctx, _parallel_config=_parallel_config)  # fmt: skip
        if attn_mask is not None or dropout_p or is_causal or enable_gqa:
            raise ValueError("the CPU ring shim computes plain attention only (no mask, dropout, causality or GQA)")
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[:2]
        return out.transpose(1, 2), lse.transpose(1, 2)

    return forward_op


@contextlib.contextmanager
def cpu_shims() -> Iterator[None]:
    """What diffusers 0.42's context parallelism needs on a machine without accelerators, for the
    time of the block:

    - `torch.accelerator.device_count()` is 1: diffusers places rank r on device r % count, a
      division by zero when the count is 0 (every rank's device is the CPU);
    - the native backend's forward op returns the log-sum-exp when ring attention asks for it
      (diffusers' raises instead), from the CPU's flash attention kernel.
    """
    from diffusers.models import attention_dispatch

    count, op = torch.accelerator.device_count, attention_dispatch._native_attention_forward_op
    torch.accelerator.device_count = lambda: 1
    attention_dispatch._native_attention_forward_op = _forward_op_with_lse(op)
    try:
        yield
    finally:
        torch.accelerator.device_count = count
        attention_dispatch._native_attention_forward_op = op
