"""Patching a diffusers UNet (or a pipeline holding one) with agent attention.

The patch uses two diffusers/PyTorch extension points only: the attention processor of
each selected self-attention layer, and one forward pre-hook on the UNet that reads the
latent size and the timestep. Nothing else of the model is touched, so unpatching
restores it exactly.

The patch follows the pipeline: diffusers methods that replace processors
(`enable_attention_slicing`, `enable_xformers_memory_efficient_attention`,
`fuse_qkv_projections`, `load_ip_adapter`, `set_attn_processor`, ...) may run before or after
it. At the start of every UNet call the hook wraps whatever processor a patched layer holds
now, so agent attention keeps acting and delegates to the user's latest processor;
`unpatch` hands each layer that processor back.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from .attention import check_backend
from .config import AgentSDConfig
from .processor import AgentSDProcessor
from .state import EXACT, AgentSDState

logger = logging.getLogger(__name__)

PATCH_ATTR = "_agentsd_patch"
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
TOMESD_REASON = (
    "its transformer block is token-merged by ToMe for SD, so agentsd never sees the layer's tokens: "
    "call tomesd.remove_patch(pipe) for agentsd to act"
)


@dataclass
class PatchedLayer:
    """A self-attention layer the patch owns: its module, level and transformer block."""

    name: str
    module: Attention
    downsample: int
    block: torch.nn.Module


@dataclass
class _Patch:
    state: AgentSDState
    layers: list[PatchedLayer]
    pipe: weakref.ref | None = None
    hook: torch.utils.hooks.RemovableHandle | None = None
    warned: set[str] = field(default_factory=set)


def patch(pipe_or_unet: Any, config: AgentSDConfig | None = None, **overrides: Any) -> Any:
    """Replace the UNet's self-attention with agent attention, in place.

    Args:
        pipe_or_unet: a diffusers `UNet2DConditionModel`, or a pipeline with one as `unet`
            (Stable Diffusion 1.x, 2.x, XL; txt2img, img2img, inpaint, ControlNet). Given a
            pipeline, the phase schedule reads T from its current scheduler at every call.
        config: the configuration; `AgentSDConfig()` (the published recipe) when None.
        **overrides: fields of `AgentSDConfig` to change, e.g. `ratio=0.5`.

    Returns:
        `pipe_or_unet`, patched. Patching a patched model replaces the earlier patch.

    Raises:
        TypeError: for a model without a diffusers UNet, or a config that is not an
            `AgentSDConfig`, or an unknown override; nothing is modified then.
        ValueError: for an override out of range, or `attention_backend="xformers"` without
            the xformers package installed; nothing is modified then.

    Example:
        >>> import agentsd
        >>> pipe = agentsd.patch(pipe)  # doctest: +SKIP
        >>> image = pipe("a photo of a cat").images[0]  # doctest: +SKIP
        >>> agentsd.unpatch(pipe)  # doctest: +SKIP
    """
    unet = _find_unet(pipe_or_unet)
    if config is None:
        config = AgentSDConfig()
    elif not isinstance(config, AgentSDConfig):
        raise TypeError(f"config must be an agentsd.AgentSDConfig, got {type(config).__name__}.")
    if overrides:
        config = config.replace(**overrides)
    # The package, not the device: a UNet patched on the CPU may be moved to CUDA before it runs.
    check_backend(config.attention_backend)
    targets = attention_layers(unet, config.max_downsample)

    previous: _Patch | None = getattr(unet, PATCH_ATTR, None)
    saved = {module: module.processor for module in unet.modules() if isinstance(module, Attention)}
    state = AgentSDState(config, _num_train_timesteps(pipe_or_unet))
    layers = [PatchedLayer(name, module, ds, _block_of(unet, name)) for name, (module, ds) in targets.items()]
    pipe = weakref.ref(pipe_or_unet) if hasattr(pipe_or_unet, "scheduler") else None
    record = _Patch(state, layers, pipe)
    try:
        if previous is not None:  # layers of the earlier patch that this one leaves alone
            for layer in previous.layers:
                if layer.name not in targets and _is_ours(layer.module.processor, previous):
                    layer.module.set_processor(_delegate_of(layer.module.processor))
        _sync(record)
    except BaseException:
        for module, processor in saved.items():  # put back what was there, the earlier patch included
            if module.processor is not processor:
                module.set_processor(processor)
        raise
    if previous is not None:
        _detach(unet, previous)
    record.hook = unet.register_forward_pre_hook(_BeginCall(record), with_kwargs=True)
    unet.set_default_attn_processor = _DefaultProcessors(unet, record)
    setattr(unet, PATCH_ATTR, record)

    if not layers:
        logger.warning(
            "agentsd patched no layer: this UNet has no self-attention at downsample <= %d "
            "(SDXL has none at 1). Set max_downsample=2 (or higher) to patch it.",
            config.max_downsample,
        )
    return pipe_or_unet


def unpatch(pipe_or_unet: Any) -> Any:
    """Remove the patch; a no-op if unpatched.

    Every patched layer gets back the processor agentsd delegates to: the one it replaced, or
    the one the user set after patching (`set_attn_processor`, `enable_attention_slicing`,
    `fuse_qkv_projections`, ...). A processor the user set after the last UNet call is left as
    the user set it. So the pipeline ends as it would be without agentsd.
    """
    unet = _find_unet(pipe_or_unet)
    record: _Patch | None = getattr(unet, PATCH_ATTR, None)
    if record is None:
        return pipe_or_unet
    for layer in record.layers:
        current = layer.module.processor
        if isinstance(current, AgentSDProcessor) and current.state in (record.state, None):
            layer.module.set_processor(_delegate_of(current))
    _detach(unet, record)
    return pipe_or_unet


def _detach(unet: UNet2DConditionModel, record: _Patch) -> None:
    """Remove what the patch added to the UNet besides its processors."""
    record.hook.remove()
    if isinstance(unet.__dict__.get("set_default_attn_processor"), _DefaultProcessors):
        del unet.set_default_attn_processor
    # `fuse_qkv_projections` keeps the processors it replaced, to restore them when unfusing.
    stash = getattr(unet, "original_attn_processors", None)
    if isinstance(stash, dict):
        for name, processor in stash.items():
            stash[name] = _delegate_of(processor)
    record.state.plans = {}  # a stale agentsd processor put back later only delegates
    if getattr(unet, PATCH_ATTR, None) is record:
        delattr(unet, PATCH_ATTR)


def is_patched(pipe_or_unet: Any) -> bool:
    """Whether agentsd is patched into `pipe_or_unet` (a pipeline or a UNet) and can act on at
    least one layer. A patch that matched no layer, or whose every layer is out of its reach
    (token-merged by another patch), is not: `agentsd.status` says why."""
    try:
        unet = _find_unet(pipe_or_unet)
    except TypeError:
        return False
    record = getattr(unet, PATCH_ATTR, None)
    return record is not None and any(_blocker(layer, record) is None for layer in record.layers)


def patched_config(pipe_or_unet: Any) -> AgentSDConfig | None:
    """The configuration of the patch installed, or None when not patched."""
    record = getattr(_find_unet(pipe_or_unet), PATCH_ATTR, None)
    return None if record is None else record.state.config


def current_phase(pipe_or_unet: Any) -> str | None:
    """The schedule phase of the patched UNet's latest call, "agent" or "tome", when some layer
    ran agent attention or token merging in it; None when unpatched, not called yet, or when
    every layer ran exact attention (too small a grid, `late_ratio=0`, out of agentsd's reach).
    Handy in a `callback_on_step_end` to see the schedule at work."""
    record = getattr(_find_unet(pipe_or_unet), PATCH_ATTR, None)
    if record is None or record.state.latent_hw is None:
        return None
    acting = set(record.state.latest_modes().values()) - {EXACT}
    return record.state.phase if acting else None


@contextmanager
def patched(pipe_or_unet: Any, config: AgentSDConfig | None = None, **overrides: Any) -> Iterator[Any]:
    """Patch for the duration of a `with` block, then restore what was there before.

    Example:
        >>> with agentsd.patched(pipe, ratio=0.5):  # doctest: +SKIP
        ...     image = pipe("a photo of a cat").images[0]
    """
    previous = patched_config(pipe_or_unet)
    patch(pipe_or_unet, config, **overrides)
    try:
        yield pipe_or_unet
    finally:
        if previous is None:
            unpatch(pipe_or_unet)
        else:
            patch(pipe_or_unet, previous)


@contextmanager
def unpatched(pipe_or_unet: Any) -> Iterator[Any]:
    """Run without agentsd for the duration of a `with` block, then put the patch back (with
    its configuration) if there was one."""
    previous = patched_config(pipe_or_unet)
    unpatch(pipe_or_unet)
    try:
        yield pipe_or_unet
    finally:
        if previous is not None:
            patch(pipe_or_unet, previous)


def attention_layers(unet: UNet2DConditionModel, max_downsample: int) -> dict[str, tuple[Attention, int]]:
    """The self-attention layers (`attn1`) at levels downsampled at most `max_downsample` times.

    Returns:
        Processor names (as in `unet.attn_processors`) mapped to their `Attention` module and
        the downsampling of their level.
    """
    found = {}
    for prefix, block, downsample in _blocks_with_levels(unet):
        if downsample > max_downsample:
            continue
        for name, module in block.named_modules():
            # diffusers < 0.27 has no `is_cross_attention`: a cross-attending attn1 (only_cross_attention)
            # is then patched too, and its calls, which carry encoder_hidden_states, go to the original.
            cross = getattr(module, "is_cross_attention", False)
            if isinstance(module, Attention) and name.split(".")[-1] == "attn1" and not cross:
                found[f"{prefix}.{name}.processor"] = (module, downsample)
    return found


def _blocks_with_levels(unet: UNet2DConditionModel) -> Iterator[tuple[str, torch.nn.Module, int]]:
    level = 0
    for i, block in enumerate(unet.down_blocks):
        yield f"down_blocks.{i}", block, 2**level
        if getattr(block, "downsamplers", None):
            level += 1
    if unet.mid_block is not None:
        yield "mid_block", unet.mid_block, 2**level
    for i, block in enumerate(unet.up_blocks):
        yield f"up_blocks.{i}", block, 2**level
        if getattr(block, "upsamplers", None):
            level -= 1


def _block_of(unet: UNet2DConditionModel, name: str) -> torch.nn.Module:
    """The module holding the attention layer of processor name `name` (its transformer block)."""
    return unet.get_submodule(name.removesuffix(".processor").rsplit(".", 1)[0])


def _is_ours(processor: Any, record: _Patch) -> bool:
    return isinstance(processor, AgentSDProcessor) and processor.state is record.state


def _delegate_of(processor: Any) -> Any:
    """The processor an agentsd processor delegates to (any other processor is its own)."""
    while isinstance(processor, AgentSDProcessor):
        processor = processor.original
    return processor


def _blocker(layer: PatchedLayer, record: _Patch) -> str | None:
    """Why agentsd cannot act on `layer` as the model is now; None when it can."""
    if _token_merged(layer.block):
        return TOMESD_REASON
    processor = layer.module.processor
    if _is_ours(processor, record):
        return None
    delegate = _delegate_of(processor)
    if isinstance(delegate, torch.nn.Module) and any(True for _ in delegate.parameters()):
        return (
            f"its processor {type(delegate).__name__} holds weights of its own, which wrapping it would take "
            "out of the model: agentsd leaves it alone"
        )
    return None


def _token_merged(block: torch.nn.Module) -> bool:
    """Whether ToMe for SD patched this transformer block: it swaps the block's class for a
    `ToMeBlock` subclass while applied (and leaves `_tome_info` behind when removed)."""
    return type(block).__name__ == "ToMeBlock" and hasattr(block, "_tome_info")


def _sync(record: _Patch) -> None:
    """Make every patched layer run agentsd over the processor it holds now, or record why it
    cannot (and warn once per reason)."""
    blocked = {}
    for layer in record.layers:
        reason = _blocker(layer, record)
        current = layer.module.processor
        if reason is not None:
            blocked[layer.name] = reason
        elif not _is_ours(current, record):  # ours may also come back, e.g. by unfuse_qkv_projections
            delegate = _delegate_of(current)
            layer.module.set_processor(AgentSDProcessor(delegate, record.state, layer.name, layer.downsample))
    record.state.blocked = blocked
    for reason in dict.fromkeys(blocked.values()):
        names = [name for name, r in blocked.items() if r == reason]
        key = reason + "|" + ",".join(names)
        if key not in record.warned:
            record.warned.add(key)
            logger.warning("agentsd cannot act on %s: %s.", ", ".join(names), reason)


class _BeginCall:
    """The UNet forward pre-hook: follows processor and scheduler changes, then hands the latent
    and the timestep to the shared state."""

    def __init__(self, record: _Patch):
        self.record = record

    @torch.compiler.disable
    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        pipe = self.record.pipe() if self.record.pipe is not None else None
        if pipe is not None:
            self.record.state.num_train_timesteps = _num_train_timesteps(pipe)
        _sync(self.record)
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.record.state.begin_call(sample, timestep)


class _DefaultProcessors:
    """`unet.set_default_attn_processor()` on a patched UNet: diffusers' own method, run on the
    processors agentsd delegates to; agentsd then wraps the default processors it sets."""

    def __init__(self, unet: UNet2DConditionModel, record: _Patch):
        self.unet_ref, self.record = weakref.ref(unet), record

    def __call__(self) -> None:
        unet = self.unet_ref()
        try:
            for layer in self.record.layers:
                if _is_ours(layer.module.processor, self.record):
                    layer.module.set_processor(_delegate_of(layer.module.processor))
            type(unet).set_default_attn_processor(unet)
        finally:
            _sync(self.record)


def _find_unet(obj: Any) -> UNet2DConditionModel:
    unet = getattr(obj, "unet", obj)
    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet
    if isinstance(unet, UNet2DConditionModel):
        return unet
    if hasattr(obj, "transformer"):
        what = f"{type(obj).__name__} is transformer-based (like PixArt, SD3, Flux) and has no UNet"
    else:
        what = f"{type(obj).__name__} is neither a diffusers UNet2DConditionModel nor a pipeline holding one as `unet`"
    raise TypeError(
        f"agentsd supports Stable Diffusion UNets (SD 1.x, 2.x, XL): {what}. "
        "Pass a StableDiffusion*/StableDiffusionXL* pipeline or its `unet`."
    )


def _num_train_timesteps(obj: Any) -> int:
    scheduler = getattr(obj, "scheduler", None)
    config = getattr(scheduler, "config", None)
    return int(getattr(config, "num_train_timesteps", None) or DEFAULT_NUM_TRAIN_TIMESTEPS)
