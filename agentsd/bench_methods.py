"""The methods the benchmark times: how each one runs a UNet, and which can run here.

Methods:
    baseline          diffusers' default processors (SDPA)
    xformers          diffusers' xformers processors (when xformers runs here)
    agentsd-agent     the preset in its agent phase
    agentsd-tome      the preset in its ToMe-only phase
    agentsd-schedule  derived: agent_steps x agent + (1 - agent_steps) x tome
    tomesd            ToMe for SD at the preset's ratio and max_downsample (when installed)
    reference         the agent phase computed with unfused einsum, as the published code does
    ceiling           the patched self-attention layers replaced by a zero-cost stand-in: the
                      bound of any method that changes self-attention only

Opt-in methods (run only when named in `methods`): the agent phase with an option that
changes outputs,
    agentsd-shared    one matching per grid and UNet call (`share_matching=True`)
    agentsd-pool      pooled agents (`agent_selection="pool"`)
    agentsd-pool-r0   pooled agents and no merge (`ratio=0`): no matching at all
and methods for large images,
    highres           the `highres` preset (two levels, agent phase on every step), whatever
                      the scenario's preset; its ceiling fraction is against `ceiling-2`
    ceiling-2         the ceiling over two levels (`max_downsample=2`): the bound of `highres`
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator

import torch
from diffusers import UNet2DConditionModel

from .config import AgentSDConfig
from .patch import attention_layers, patch, unpatch
from .presets import load_preset

METHODS = ("baseline", "xformers", "agentsd-agent", "agentsd-tome", "tomesd", "reference", "ceiling")
OPTIONAL_METHODS = ("agentsd-shared", "agentsd-pool", "agentsd-pool-r0", "highres", "ceiling-2")
# The agentsd methods: the config overrides that make each one.
AGENTSD_METHODS = {
    "agentsd-agent": dict(agent_steps=1.0),
    "agentsd-tome": dict(agent_steps=0.0),
    "reference": dict(agent_steps=1.0, attention_backend="einsum"),
    "agentsd-shared": dict(agent_steps=1.0, share_matching=True),
    "agentsd-pool": dict(agent_steps=1.0, agent_selection="pool"),
    "agentsd-pool-r0": dict(agent_steps=1.0, agent_selection="pool", ratio=0.0),
}
# Methods that run a preset of their own instead of the scenario's.
PRESET_METHODS = {"highres": "highres"}
# Each method's ceiling: the zero-cost stand-in on the levels the method patches.
CEILINGS = {"ceiling-2": 2}
CEILING_OF = {"highres": "ceiling-2", "ceiling-2": "ceiling-2"}
COMPILABLE = ("baseline", "ceiling", *CEILINGS, *AGENTSD_METHODS, *PRESET_METHODS)


class ZeroCostAttention:
    """The ceiling's stand-in for self-attention: returns its input, computing nothing."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return hidden_states


@contextlib.contextmanager
def _replaced_processors(unet: UNet2DConditionModel, replace: Callable[[], None]) -> Iterator[None]:
    saved = dict(unet.attn_processors)
    replace()
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


def method_context(method: str, unet: UNet2DConditionModel, config: AgentSDConfig):
    """A context manager that runs `unet` as `method` inside it and restores it after."""
    if method == "baseline":
        return contextlib.nullcontext()
    if method == "xformers":
        return _replaced_processors(unet, unet.enable_xformers_memory_efficient_attention)
    if method == "ceiling" or method in CEILINGS:
        layers = attention_layers(unet, CEILINGS.get(method, config.max_downsample))
        return _replaced_processors(unet, lambda: [m.set_processor(ZeroCostAttention()) for m, _ in layers.values()])
    if method == "tomesd":
        import tomesd

        return _tomesd(unet, tomesd, config)
    if method in PRESET_METHODS:
        return _agentsd(unet, load_preset(PRESET_METHODS[method]))
    if method not in AGENTSD_METHODS:
        raise ValueError(f"unknown method {method!r}: use any of {', '.join(METHODS + OPTIONAL_METHODS)}.")
    return _agentsd(unet, config.replace(**AGENTSD_METHODS[method]))


@contextlib.contextmanager
def _agentsd(unet, config):
    patch(unet, config)
    try:
        yield
    finally:
        unpatch(unet)


@contextlib.contextmanager
def _tomesd(unet, tomesd, config):
    tomesd.apply_patch(unet, ratio=config.ratio, max_downsample=config.max_downsample)
    try:
        yield
    finally:
        tomesd.remove_patch(unet)


def available_methods(device: torch.device) -> list[str]:
    """The methods that can run here: xformers needs CUDA and xformers, tomesd its package."""
    methods = list(METHODS)
    if device.type != "cuda" or importlib.util.find_spec("xformers") is None:
        methods.remove("xformers")
    if importlib.util.find_spec("tomesd") is None:
        methods.remove("tomesd")
    return methods
