"""The methods the benchmark times: how each one runs a model, and which can run here.

Methods:
    baseline          diffusers' default processors (SDPA)
    xformers          diffusers' xformers processors (when xformers runs here)
    agentsd-agent     the preset in its agent phase
    agentsd-tome      the preset in its ToMe-only phase
    agentsd-schedule  derived: agent_steps x agent + (1 - agent_steps) x tome
    tomesd            ToMe for SD at the preset's ratio and max_downsample (when installed)
    reference         the agent phase computed with unfused einsum, as the published code does
    ceiling           the layers the preset patches replaced by a zero-cost stand-in: the bound
                      of any method that changes only those (the UNets' self-attention; SD 3's
                      joint attention, its stand-in returning the image and text tokens as
                      given; PixArt's self-attention; Flux's double-stream attention, returning
                      the image and text tokens as given, and single-stream attention, returning
                      its [text; image] input; Wan's video self-attention, returning its input)

Opt-in methods (run only when named in `methods`): the agent phase with an option that
changes outputs,
    agentsd-shared    one matching per grid and model call (`share_matching=True`)
    agentsd-pool      pooled agents (`agent_selection="pool"`)
    agentsd-pool-r0   pooled agents and no merge (`ratio=0`): no matching at all
and methods for large images,
    highres           the `highres` preset (two levels, agent phase on every step), whatever
                      the scenario's preset; its ceiling fraction is against `ceiling-2`
    ceiling-2         the ceiling over two levels (`max_downsample=2`): the bound of `highres`
and a second bound,
    ceiling-products  the layers the preset patches with their attention products costing nothing:
                      each runs its own processor with every query given its own token's value,
                      so the projections, QK norms, rotary embeddings and output projection stay.
                      The bound of a method that only cuts the attention products; agent attention
                      also saves the projections of merged tokens, so it can pass this bound. On
                      the diffusion transformers, where the projections weigh as much as the
                      products, it tells how much of the attention products agentsd removed.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator

import torch

from ..api.patch import patch, unpatch
from ..api.presets import load_preset
from ..core.config import AgentSDConfig
from ..families import find_model
from ..families.base import Layer
from ..processors.flux_attention import FluxAgentSDProcessor
from ..processors.joint_attention import JointAgentSDProcessor
from ..processors.wan_attention import WanAgentSDProcessor

METHODS = ("baseline", "xformers", "agentsd-agent", "agentsd-tome", "tomesd", "reference", "ceiling")
OPTIONAL_METHODS = ("agentsd-shared", "agentsd-pool", "agentsd-pool-r0", "highres", "ceiling-2", "ceiling-products")
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
COMPILE_SUFFIX = "+compile"  # the rows of a method under torch.compile: `<method>+compile`


class ZeroCostAttention:
    """The ceiling's stand-in for self-attention: returns its input, computing nothing."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return hidden_states


class ZeroCostJointAttention:
    """The ceiling's stand-in for SD 3's joint attention: returns the image tokens and, when
    called with text, the text tokens too, as the `(image, text)` pair diffusers' joint
    processor returns (the same shapes: both streams keep the model's width), computing nothing.
    Called without text (SD 3.5's image-only `attn2`) it returns the image tokens alone."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


class ZeroCostFluxAttention:
    """The ceiling's stand-in for Flux's attention, called as `FluxAttention` calls its processor
    (`processor(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)`,
    positionally): a double-stream layer's `(image, text)` pair as given, a single-stream
    layer's [text; image] input as given (what `FluxAttnProcessor` returns has those shapes:
    Flux's attention keeps the model's width), computing nothing."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):  # fmt: skip
        return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


class ZeroCostWanAttention:
    """The ceiling's stand-in for Wan's video self-attention (`attn1`), called as `WanAttention`
    calls its processor (`processor(attn, hidden_states, encoder_hidden_states, attention_mask,
    rotary_emb)`, positionally): returns the video tokens as given (Wan's attention keeps the
    model's width), computing nothing."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):  # fmt: skip
        return hidden_states


def _own_values(query, key, value, *args, **kwargs):
    """`ceiling-products`' stand-in for torch's SDPA: every query gets its own token's value (the
    patched layers are self- or joint attention: as many queries as keys), with no product."""
    return value


class FreeProducts:
    """`ceiling-products`' stand-in: the layer's own processor, its attention products (torch's
    SDPA, called directly or through diffusers' dispatcher) replaced by `_own_values` for the
    duration of the call."""

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, *args, **kwargs):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = _own_values
        try:
            return self.original(attn, *args, **kwargs)
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa


def zero_cost(
    layer: Layer,
) -> ZeroCostAttention | ZeroCostJointAttention | ZeroCostFluxAttention | ZeroCostWanAttention:
    """The ceiling's stand-in for a layer the family patches."""
    if issubclass(layer.processor, FluxAgentSDProcessor):
        return ZeroCostFluxAttention()
    if issubclass(layer.processor, WanAgentSDProcessor):
        return ZeroCostWanAttention()
    return ZeroCostJointAttention() if issubclass(layer.processor, JointAgentSDProcessor) else ZeroCostAttention()


@contextlib.contextmanager
def _replaced_processors(model: torch.nn.Module, replace: Callable[[], None]) -> Iterator[None]:
    saved = dict(model.attn_processors)
    replace()
    try:
        yield
    finally:
        model.set_attn_processor(saved)


def method_context(method: str, model: torch.nn.Module, config: AgentSDConfig):
    """A context manager that runs `model` (a UNet or a diffusion transformer) as `method`
    inside it and restores it after."""
    if method == "baseline":
        return contextlib.nullcontext()
    if method == "xformers":
        return _replaced_processors(model, model.enable_xformers_memory_efficient_attention)
    if method == "ceiling" or method in CEILINGS:
        levels = config.replace(max_downsample=CEILINGS[method]) if method in CEILINGS else config
        family, found = find_model(model)
        layers = family.layers(found, levels).values()
        return _replaced_processors(model, lambda: [layer.module.set_processor(zero_cost(layer)) for layer in layers])
    if method == "ceiling-products":
        family, found = find_model(model)
        layers = family.layers(found, config).values()
        return _replaced_processors(
            model, lambda: [layer.module.set_processor(FreeProducts(layer.module.processor)) for layer in layers]
        )
    if method == "tomesd":
        import tomesd

        return _tomesd(model, tomesd, config)
    if method in PRESET_METHODS:
        return _agentsd(model, load_preset(PRESET_METHODS[method]))
    if method not in AGENTSD_METHODS:
        raise ValueError(f"unknown method {method!r}: use any of {', '.join(METHODS + OPTIONAL_METHODS)}.")
    return _agentsd(model, config.replace(**AGENTSD_METHODS[method]))


@contextlib.contextmanager
def _agentsd(model, config):
    patch(model, config)
    try:
        yield
    finally:
        unpatch(model)


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
