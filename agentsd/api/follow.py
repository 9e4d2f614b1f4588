"""How a patched model follows its pipeline, call by call: the forward hooks that plan each call
(`BeginCall`, under context parallelism on each rank's shard) and count it (`EndCall`), and the
processor bookkeeping they rely on (`sync`: every patched layer wraps whatever processor it
holds now, or says why it cannot). A `record` here is `agentsd.api.patch`'s record of one patch,
a `layer` one of its patched layers (typed loosely: patch.py imports this module, not the
other way round)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from ..core.plans import Sequence
from ..families import family
from ..processors.self_attention import CONTEXT_PARALLEL, AgentSDProcessor

logger = logging.getLogger(__name__)

TOMESD_REASON = (
    "its transformer block is token-merged by ToMe for SD, so agentsd never sees the layer's tokens: "
    "call tomesd.remove_patch(pipe) for agentsd to act"
)


def is_ours(processor: Any, record: Any) -> bool:
    return isinstance(processor, AgentSDProcessor) and processor.state is record.state


def delegate_of(processor: Any) -> Any:
    """The processor an agentsd processor delegates to (any other processor is its own)."""
    while isinstance(processor, AgentSDProcessor):
        processor = processor.original
    return processor


def blocker(layer: Any, record: Any) -> str | None:
    """Why agentsd cannot act on `layer` as the model is now; None when it can."""
    if token_merged(layer.block):
        return TOMESD_REASON
    processor = layer.module.processor
    if is_ours(processor, record):
        return None
    delegate = delegate_of(processor)
    if layer.processor.serving(delegate) is None:
        return (
            f"its processor {type(delegate).__name__} holds weights of its own, which wrapping it would take "
            "out of the model: agentsd leaves it alone"
        )
    return None


def token_merged(block: torch.nn.Module) -> bool:
    """Whether ToMe for SD patched this transformer block: it swaps the block's class for a
    `ToMeBlock` subclass while applied (and leaves `_tome_info` behind when removed)."""
    return type(block).__name__ == "ToMeBlock" and hasattr(block, "_tome_info")


def sync(record: Any) -> None:
    """Make every patched layer run agentsd over the processor it holds now, or record why it
    cannot (and warn once per reason)."""
    blocked = {}
    for layer in record.layers:
        reason = blocker(layer, record)
        current = layer.module.processor
        if reason is not None:
            blocked[layer.name] = reason
        elif not is_ours(current, record):  # ours may also come back, e.g. by unfuse_qkv_projections
            delegate = delegate_of(current)
            wrapper = layer.processor.serving(delegate)
            layer.module.set_processor(wrapper(delegate, record.state, layer.name, layer.downsample))
    record.state.blocked = blocked
    for reason in dict.fromkeys(blocked.values()):
        names = [name for name, r in blocked.items() if r == reason]
        key = reason + "|" + ",".join(names)
        if key not in record.warned:
            record.warned.add(key)
            logger.warning("agentsd cannot act on %s: %s.", ", ".join(names), reason)


class BeginCall:
    """The model's forward pre-hook: follows processor and scheduler changes, then plans the call
    of the model's layers (`names`) from what the family reads off its inputs (latent, timestep,
    token grid)."""

    def __init__(self, record: Any, names: frozenset[str] | None = None):
        self.record, self.names = record, names

    @torch.compiler.disable
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        record = self.record
        clock = record.clock_of_call(module)
        sync(record)
        kind = family(record.family)
        call = kind.read_call(module, args, kwargs)
        parallel = getattr(module, "_parallel_config", None)
        if parallel is not None and getattr(parallel, "context_parallel_config", None) is not None:
            call = shard(kind, call, parallel.context_parallel_config)
        record.state.begin_call(call.sample, call.timestep, call.grid, call.sequence, clock, self.names)


def shard(kind: Any, call: Any, config: Any) -> Any:
    """The call as each rank's layers see it under diffusers' context parallelism (`enable_parallelism`):
    the family's shard-local call, or every layer exact with the reason."""
    ranks = config._world_size or (config.ring_degree or 1) * (config.ulysses_degree or 1)
    fits = call.sequence is None or call.sequence.unfit is None
    if kind.shard is not None and fits:
        local = kind.shard(call, ranks, torch.distributed.get_rank(config._flattened_mesh.get_group()))
    else:
        local = CONTEXT_PARALLEL
    if isinstance(local, str):
        return replace(call, sequence=replace(call.sequence or Sequence(), unfit=local))
    return local


class EndCall:
    """The model's forward hook: counts what the call did."""

    def __init__(self, record: Any):
        self.record = record

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.record.state.end_call()
