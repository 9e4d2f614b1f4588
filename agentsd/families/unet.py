"""The UNet family: Stable Diffusion 1.x, 2.x and XL (`UNet2DConditionModel`).

agentsd patches the self-attention (`attn1`) of the UNet's transformer blocks at levels
downsampled at most `max_downsample` times relative to the latent; the token grid of a call is
the latent's, and the timestep is the forward's second argument.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from ..core.config import AgentSDConfig
from ..processors.self_attention import AgentSDProcessor
from .base import Family, Layer, ModelCall

# Deeper than any UNet level: where no self-attention is found even here, the UNet has none.
ANY_LEVEL = 2**20


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


def layers(unet: UNet2DConditionModel, config: AgentSDConfig) -> dict[str, Layer]:
    """The layers to patch: `attention_layers` at `config.max_downsample`."""
    return {
        name: Layer(module, downsample, _block_of(unet, name), AgentSDProcessor)
        for name, (module, downsample) in attention_layers(unet, config.max_downsample).items()
    }


def read_call(unet: UNet2DConditionModel, args: tuple, kwargs: dict) -> ModelCall:
    """The pipelines call `unet(latents, t, ...)`, t positional (or both as keywords)."""
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    return ModelCall(sample, timestep)


def nothing_patched(unet: UNet2DConditionModel, config: AgentSDConfig) -> str:
    if not attention_layers(unet, ANY_LEVEL):
        return (
            "this UNet has no self-attention layer agentsd can patch at any level (its attention blocks have "
            "no transformer attn1, as in Kandinsky, IF or UnCLIP UNets), so agentsd does nothing here"
        )
    return (
        f"this UNet has no self-attention at downsample <= {config.max_downsample} (SDXL has none at 1). "
        "Set max_downsample=2 (or higher) to patch it"
    )


FAMILY = Family(
    name="unet",
    models="Stable Diffusion UNets (SD 1.x, 2.x, XL: UNet2DConditionModel)",
    attribute="unet",
    model_class="UNet2DConditionModel",
    layers=layers,
    read_call=read_call,
    nothing_patched=nothing_patched,
    preset="paper",
    noun="UNet",
)
