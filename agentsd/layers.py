"""Which layers of a UNet agentsd patches: the self-attention (`attn1`) of its transformer
blocks, with the downsampling of their level relative to the latent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention


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
