"""Patching a diffusers model (or a pipeline holding one) with agent attention.

The model is a Stable Diffusion UNet or a diffusion transformer (SD 3 / 3.5, PixArt, Flux.1): its
family (`agentsd.families`) says which attention layers to patch and how a call gives the
latent, the token grid and the timestep; everything here is family-blind. The patch uses two
diffusers/PyTorch extension points only: the attention processor of each selected layer, and
forward hooks on the model that read the call's inputs at its start and count what it did at
its end. Nothing else of the model is touched, so unpatching restores it exactly.

The patch follows the pipeline: diffusers methods that replace processors
(`enable_attention_slicing`, `enable_xformers_memory_efficient_attention`,
`fuse_qkv_projections`, `load_ip_adapter`, `set_attn_processor`, ...) may run before or after
it. At the start of every UNet call the hook wraps whatever processor a patched layer holds
now, so agent attention keeps acting and delegates to the user's latest processor;
`unpatch` hands each layer that processor back.

A patched model may serve several calls at once (threads, pipelines made with `from_pipe`):
each call's plan belongs to the thread running it (`agentsd.core.state`), and its phase follows the
scheduler of the pipeline making it (`agentsd.api.caller`). It can be deep-copied (the copy is an
independent patched model) and pickled (it loads back patched).
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import Attention

from ..core.attention import check_backend
from ..core.config import AgentSDConfig
from ..core.progress import Clock, ClockCache
from ..core.state import AgentSDState
from ..families import family, find_model
from ..families.unet import attention_layers
from ..processors.self_attention import AgentSDProcessor
from .caller import calling_pipeline
from .follow import BeginCall, EndCall, blocker, delegate_of, is_ours, sync

__all__ = ["attention_layers", "current_phase", "is_patched", "patch", "patched", "patched_config", "unpatch"]

logger = logging.getLogger(__name__)

PATCH_ATTR = "_agentsd_patch"


@dataclass
class PatchedLayer:
    """An attention layer the patch owns: its module, level, transformer block and the agentsd
    processor class that wraps it."""

    name: str
    module: torch.nn.Module
    downsample: int
    block: torch.nn.Module
    processor: type = AgentSDProcessor
    model: torch.nn.Module | None = None


@dataclass
class _Patch:
    """A patch installed on a model (or on both experts of Wan 2.2 A14B, with one state): its
    state, layers, family (by name), the models it is on, the pipeline whose scheduler it reads
    (weakly held), its hook handles and the warnings given."""

    state: AgentSDState
    layers: list[PatchedLayer]
    family: str = "unet"
    pipe: weakref.ref | None = None
    hooks: tuple[torch.utils.hooks.RemovableHandle, ...] = ()
    warned: set = field(default_factory=set)
    clocks: ClockCache = field(default_factory=ClockCache)
    models: list[torch.nn.Module] = field(default_factory=list)

    def clock_of_call(self, model: torch.nn.Module) -> Clock:
        """The clock of the model call about to run: the scheduler of the pipeline making it
        (found on the calling thread's stack); outside any pipeline, the scheduler of the pipeline
        patched, or else the clock last read (training timesteps on a fresh patch). The
        latter two are a guess when pipelines with other schedulers use the model: said once."""
        pipe = calling_pipeline(model)
        if pipe is not None:
            clock = self.clocks(pipe.scheduler)
            self.state.clock = clock  # what a call outside any pipeline, or a loaded copy, falls back on
            return clock
        patched_pipe = self.pipe() if self.pipe is not None else None
        clock = self.clocks(patched_pipe.scheduler) if patched_pipe is not None else self.state.clock
        others = self.clocks.schedulers_other_than(clock)
        if others and ("outside", tuple(others)) not in self.warned:
            self.warned.add(("outside", tuple(others)))
            source = (
                f"as {type(patched_pipe.scheduler).__name__}'s, the scheduler of the pipeline patched"
                if patched_pipe is not None
                else "as the last pipeline call's"
            )
            logger.warning(
                "agentsd: the %s was called outside a pipeline, so agentsd cannot tell which scheduler its timestep "
                "comes from; pipelines with other schedulers (%s) use this model. It reads the timestep %s. "
                "Call the model through its pipeline for the phase schedule to follow that pipeline's scheduler.",
                family(self.family).noun,
                ", ".join(others),
                source,
            )
        return clock

    def __getstate__(self) -> dict:
        # A weak reference does not pickle: a loaded model is patched on its own, with the
        # clock its scheduler last gave (`state.clock`).
        return dict(self.__dict__, pipe=None)

    def __deepcopy__(self, memo: dict) -> _Patch:
        new = copy.copy(self)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name != "pipe":
                setattr(new, name, copy.deepcopy(value, memo))
        # The pipeline patched is the fallback for calls made outside any pipeline: copied with
        # the model, the copy falls back on the copied pipeline; copied alone, on none.
        pipe = self.pipe() if self.pipe is not None else None
        copied = memo.get(id(pipe)) if pipe is not None else None
        new.pipe = weakref.ref(copied) if copied is not None else None
        return new


def patch(pipe_or_unet: Any, config: AgentSDConfig | None = None, **overrides: Any) -> Any:
    """Replace the model's self-attention with agent attention, in place.

    Args:
        pipe_or_unet: a pipeline, or its model: Stable Diffusion 1.x, 2.x, XL (a
            `UNet2DConditionModel`; txt2img, img2img, inpaint, ControlNet), Stable Diffusion 3 /
            3.5 (`SD3Transformer2DModel`), PixArt-alpha / -Sigma (`PixArtTransformer2DModel`),
            Flux.1 (`FluxTransformer2DModel`; its img2img, inpaint, Fill, Kontext and ControlNet
            pipelines too), Wan 2.1 / 2.2 (`WanTransformer3DModel`; text-, image- and
            video-to-video; a Wan 2.2 A14B pipeline's two experts get one patch with one state,
            and unpatching either removes it from both). Every call's phase schedule reads
            progress through the scheduler of the pipeline making the call (`agentsd.api.caller`).
        config: the configuration; `AgentSDConfig()` (the published recipe) when None.
        **overrides: fields of `AgentSDConfig` to change, e.g. `ratio=0.5`.

    Returns:
        `pipe_or_unet`, patched. Patching a patched model replaces the earlier patch.

    Raises:
        TypeError: for a model of no supported family (the message names them), or a config
            that is not an `AgentSDConfig`, or an unknown override; nothing is modified then.
        ValueError: for an override out of range, or `attention_backend="xformers"` without
            the xformers package installed; nothing is modified then.

    Example:
        >>> import agentsd
        >>> pipe = agentsd.patch(pipe)  # doctest: +SKIP
        >>> image = pipe("a photo of a cat").images[0]  # doctest: +SKIP
        >>> agentsd.unpatch(pipe)  # doctest: +SKIP
    """
    kind, _ = find_model(pipe_or_unet)
    models = kind.models_of(pipe_or_unet)
    if config is None:
        config = AgentSDConfig()
    elif not isinstance(config, AgentSDConfig):
        raise TypeError(f"config must be an agentsd.AgentSDConfig, got {type(config).__name__}.")
    if overrides:
        config = config.replace(**overrides)
    # The package, not the device: a model patched on the CPU may be moved to CUDA before it runs.
    check_backend(config.attention_backend)
    # Layer names are the processor names in each model; a further expert's are prefixed with its
    # attribute ("transformer_2.blocks.0.attn1.processor"), so that one state tells them apart.
    targets = [
        (model, "" if attribute in ("", kind.attribute) else f"{attribute}.", kind.layers(model, config))
        for attribute, model in models
    ]

    pipe = pipe_or_unet if hasattr(pipe_or_unet, "scheduler") else None
    record = _Patch(AgentSDState(config), [], kind.name, weakref.ref(pipe) if pipe is not None else None)
    record.models = [model for model, _, _ in targets]
    record.layers = [
        PatchedLayer(prefix + name, layer.module, layer.downsample, layer.block, layer.processor, model)
        for model, prefix, found in targets
        for name, layer in found.items()
    ]
    _install(record)
    if not record.layers:
        logger.warning("agentsd patched no layer: %s.", kind.nothing_patched(record.models[0], config))
    return pipe_or_unet


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` that hold an attention processor (diffusers' `Attention`, and the
    attention modules of the newer transformers: `FluxAttention`, `WanAttention`, ...)."""
    return [m for m in model.modules() if isinstance(m, Attention) or callable(getattr(m, "set_processor", None))]


def _install(record: _Patch) -> None:
    """Put `record` on its models in place of any other patch, all or nothing: processors wrapped,
    hooks registered. Also puts back a patch taken off by `unpatched`, counters and all."""
    previous = {id(p): p for p in (getattr(m, PATCH_ATTR, None) for m in record.models) if p is not None}
    modules = {id(layer.module) for layer in record.layers}
    saved = {module: module.processor for model in record.models for module in _attention_modules(model)}
    record.state.active = True
    try:
        for earlier in previous.values():  # layers of an earlier patch that this one leaves alone
            for layer in earlier.layers:
                if id(layer.module) not in modules and is_ours(layer.module.processor, earlier):
                    layer.module.set_processor(delegate_of(layer.module.processor))
        sync(record)
    except BaseException:
        for module, processor in saved.items():  # put back what was there, the earlier patch included
            if module.processor is not processor:
                module.set_processor(processor)
        raise
    for earlier in previous.values():
        _detach(earlier)
    hooks = []
    for model in record.models:
        names = frozenset(layer.name for layer in record.layers if layer.model is model)
        hooks.append(model.register_forward_pre_hook(BeginCall(record, names), with_kwargs=True))
        # always_call: a call that raises is counted too.
        hooks.append(model.register_forward_hook(EndCall(record), always_call=True))
        if callable(getattr(type(model), "set_default_attn_processor", None)):
            model.set_default_attn_processor = _DefaultProcessors(model, record)
        setattr(model, PATCH_ATTR, record)
    record.hooks = tuple(hooks)


def unpatch(pipe_or_unet: Any) -> Any:
    """Remove the patch; a no-op if unpatched.

    Every patched layer gets back the processor agentsd delegates to: the one it replaced, or
    the one the user set after patching (`set_attn_processor`, `enable_attention_slicing`,
    `fuse_qkv_projections`, ...). A processor the user set after the last UNet call is left as
    the user set it. So the pipeline ends as it would be without agentsd.
    """
    record: _Patch | None = getattr(_model_of(pipe_or_unet), PATCH_ATTR, None)
    if record is None:
        return pipe_or_unet
    for layer in record.layers:
        current = layer.module.processor
        if isinstance(current, AgentSDProcessor) and current.state in (record.state, None):
            layer.module.set_processor(delegate_of(current))
    _detach(record)
    return pipe_or_unet


def _detach(record: _Patch) -> None:
    """Remove what the patch added to its models besides its processors."""
    for handle in record.hooks:
        handle.remove()
    for model in record.models:
        if isinstance(model.__dict__.get("set_default_attn_processor"), _DefaultProcessors):
            del model.set_default_attn_processor
        # `fuse_qkv_projections` keeps the processors it replaced, to restore them when unfusing.
        stash = getattr(model, "original_attn_processors", None)
        if isinstance(stash, dict):
            for name, processor in stash.items():
                stash[name] = delegate_of(processor)
        if getattr(model, PATCH_ATTR, None) is record:
            delattr(model, PATCH_ATTR)
    record.state.active = False  # a stale agentsd processor put back later only delegates


def is_patched(pipe_or_unet: Any) -> bool:
    """Whether agentsd is patched into `pipe_or_unet` (a pipeline or a UNet) and can act on at
    least one layer. A patch that matched no layer, or whose every layer is out of its reach
    (token-merged by another patch), is not: `agentsd.status` says why."""
    try:
        model = _model_of(pipe_or_unet)
    except TypeError:
        return False
    record = getattr(model, PATCH_ATTR, None)
    return record is not None and any(blocker(layer, record) is None for layer in record.layers)


def patched_config(pipe_or_unet: Any) -> AgentSDConfig | None:
    """The configuration of the patch installed, or None when not patched."""
    record = getattr(_model_of(pipe_or_unet), PATCH_ATTR, None)
    return None if record is None else record.state.config


def current_phase(pipe_or_unet: Any) -> str | None:
    """The schedule phase of the patched UNet's latest call, "agent" or "tome", when some layer
    ran agent attention or token merging in it; None when unpatched, not called yet, or when
    every layer ran exact attention (too small a grid, `late_ratio=0`, out of agentsd's reach).
    The latest call is the current thread's, when it made one. Handy in a
    `callback_on_step_end` to see the schedule at work: there it is the step just run."""
    record = getattr(_model_of(pipe_or_unet), PATCH_ATTR, None)
    call = None if record is None else record.state.view
    return call.phase if call is not None and call.acting else None


@contextmanager
def patched(pipe_or_unet: Any, config: AgentSDConfig | None = None, **overrides: Any) -> Iterator[Any]:
    """Patch for the duration of a `with` block, then restore what was there before (an
    earlier patch comes back as it was, its counters included).

    Example:
        >>> with agentsd.patched(pipe, ratio=0.5):  # doctest: +SKIP
        ...     image = pipe("a photo of a cat").images[0]
    """
    model = _model_of(pipe_or_unet)
    previous = getattr(model, PATCH_ATTR, None)
    patch(pipe_or_unet, config, **overrides)
    try:
        yield pipe_or_unet
    finally:
        if previous is None:
            unpatch(pipe_or_unet)
        else:
            _install(previous)


@contextmanager
def unpatched(pipe_or_unet: Any) -> Iterator[Any]:
    """Run without agentsd for the duration of a `with` block, then put the patch back as it
    was, if there was one: its configuration, `status` counters and `current_phase` carry on."""
    model = _model_of(pipe_or_unet)
    previous = getattr(model, PATCH_ATTR, None)
    unpatch(pipe_or_unet)
    try:
        yield pipe_or_unet
    finally:
        if previous is not None:
            _install(previous)


def _model_of(obj: Any) -> torch.nn.Module:
    """The model of a pipeline or a model (see `agentsd.families.find_model`)."""
    return find_model(obj)[1]


class _DefaultProcessors:
    """`model.set_default_attn_processor()` on a patched model: diffusers' own method, run on the
    processors agentsd delegates to; agentsd then wraps the default processors it sets. It holds
    its model (not a weak reference), so a copy of the model gets one acting on the copy."""

    def __init__(self, model: torch.nn.Module, record: _Patch):
        self.model, self.record = model, record

    def __call__(self) -> None:
        try:
            for layer in self.record.layers:
                if layer.model in (self.model, None) and is_ours(layer.module.processor, self.record):
                    layer.module.set_processor(delegate_of(layer.module.processor))
            type(self.model).set_default_attn_processor(self.model)
        finally:
            sync(self.record)
