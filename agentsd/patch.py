"""Patching a diffusers UNet (or a pipeline holding one) with agent attention.

The patch uses two diffusers/PyTorch extension points only: the attention processor of
each selected self-attention layer, and one forward pre-hook on the UNet that reads the
latent size and the timestep. Nothing else of the model is touched, so unpatching
restores it exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from .config import AgentSDConfig
from .processor import AGENT, TOME, AgentSDProcessor, AgentSDState

logger = logging.getLogger(__name__)

PATCH_ATTR = "_agentsd_patch"
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class _Patch:
    state: AgentSDState
    layers: list[tuple[Attention, Any, AgentSDProcessor]]
    hook: torch.utils.hooks.RemovableHandle


def patch(pipe_or_unet: Any, config: AgentSDConfig | None = None, **overrides: Any) -> Any:
    """Replace the UNet's self-attention with agent attention, in place.

    Args:
        pipe_or_unet: a diffusers `UNet2DConditionModel`, or a pipeline with one as `unet`
            (Stable Diffusion 1.x, 2.x, XL; txt2img, img2img, inpaint, ControlNet).
        config: the configuration; `AgentSDConfig()` (the published recipe) when None.
        **overrides: fields of `AgentSDConfig` to change, e.g. `ratio=0.5`.

    Returns:
        `pipe_or_unet`, patched. Patching a patched model replaces the earlier patch.

    Raises:
        TypeError: for a model without a diffusers UNet, or a config that is not an
            `AgentSDConfig`, or an unknown override; nothing is modified then.
        ValueError: for an override out of range; nothing is modified then.

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
    targets = attention_layers(unet, config.max_downsample)

    previous: _Patch | None = getattr(unet, PATCH_ATTR, None)
    state = AgentSDState(config, _num_train_timesteps(pipe_or_unet))
    try:
        unpatch(unet)
        layers = []
        for name, (module, downsample) in targets.items():
            processor = AgentSDProcessor(module.processor, state, name, downsample)
            layers.append((module, module.processor, processor))
        _install(unet, state, layers)
    except BaseException:
        if previous is not None:  # put the earlier patch back as it was
            previous.hook.remove()
            _install(unet, previous.state, previous.layers)
        raise

    if not layers:
        logger.warning(
            "agentsd patched no layer: this UNet has no self-attention at downsample <= %d "
            "(SDXL has none at 1). Set max_downsample=2 (or higher) to patch it.",
            config.max_downsample,
        )
    return pipe_or_unet


def _install(unet: UNet2DConditionModel, state: AgentSDState, layers: list) -> None:
    """Register the hook and set the processors, all or nothing."""
    hook = unet.register_forward_pre_hook(_BeginCall(state), with_kwargs=True)
    try:
        for module, _, processor in layers:
            module.set_processor(processor)
        setattr(unet, PATCH_ATTR, _Patch(state, layers, hook))
    except BaseException:
        for module, original, processor in layers:
            if module.processor is processor:
                module.set_processor(original)
        hook.remove()
        raise


def unpatch(pipe_or_unet: Any) -> Any:
    """Restore the original attention processors and remove the hook; a no-op if unpatched.

    A processor the user replaced after patching is left as the user set it.
    """
    unet = _find_unet(pipe_or_unet)
    record: _Patch | None = getattr(unet, PATCH_ATTR, None)
    if record is None:
        return pipe_or_unet
    for module, original, processor in record.layers:
        if module.processor is processor:
            module.set_processor(original)
    record.hook.remove()
    delattr(unet, PATCH_ATTR)
    return pipe_or_unet


def is_patched(pipe_or_unet: Any) -> bool:
    """Whether `pipe_or_unet` (a pipeline or a UNet) carries an agentsd patch."""
    try:
        unet = _find_unet(pipe_or_unet)
    except TypeError:
        return False
    return hasattr(unet, PATCH_ATTR)


def patched_config(pipe_or_unet: Any) -> AgentSDConfig | None:
    """The configuration of the current patch, or None when not patched."""
    record = getattr(_find_unet(pipe_or_unet), PATCH_ATTR, None)
    return None if record is None else record.state.config


def current_phase(pipe_or_unet: Any) -> str | None:
    """The phase of the patched UNet's latest call: "agent" or "tome"; None when unpatched
    or not called yet. Handy in a `callback_on_step_end` to see the schedule at work."""
    record = getattr(_find_unet(pipe_or_unet), PATCH_ATTR, None)
    if record is None or record.state.latent_hw is None:
        return None
    return AGENT if record.state.agent_phase else TOME


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


class _BeginCall:
    """The UNet forward pre-hook: hands the latent and the timestep to the shared state."""

    def __init__(self, state: AgentSDState):
        self.state = state

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.state.begin_call(sample, timestep)


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
