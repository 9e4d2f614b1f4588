"""The model families agentsd patches, one small module each.

A family says three things of its diffusers model, and nothing else differs between them:
which attention layers agentsd patches (and with which processor), how a model call gives the
latent, the timestep and the token grid, and where a pipeline keeps the model. The algorithm
(merging, agent attention, the per-call plans) is shared and family-blind.

    unet    UNet2DConditionModel: Stable Diffusion 1.x, 2.x, XL (`families/unet.py`)
    sd3     SD3Transformer2DModel: Stable Diffusion 3 / 3.5 (`families/sd3.py`)
    pixart  PixArtTransformer2DModel: PixArt-alpha, PixArt-Sigma (`families/pixart.py`)
    flux    FluxTransformer2DModel: Flux.1 (`families/flux.py`)
    wan     WanTransformer3DModel: Wan 2.1 / 2.2 video (`families/wan.py`)
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Family, Layer, ModelCall

__all__ = ["Family", "Layer", "ModelCall", "family", "find_model", "names", "supported"]


def _registry() -> dict[str, Family]:
    from . import flux, pixart, sd3, unet, wan

    families = (unet.FAMILY, sd3.FAMILY, pixart.FAMILY, flux.FAMILY, wan.FAMILY)
    return {family.name: family for family in families}


def names() -> list[str]:
    """The families' names."""
    return list(_registry())


def family(name: str) -> Family:
    """The family of that name."""
    return _registry()[name]


def supported() -> str:
    """The supported families, in words."""
    return "; ".join(f.models for f in _registry().values())


def find_model(obj: Any) -> tuple[Family, torch.nn.Module]:
    """The family and the model of a pipeline or a model (a torch.compile'd one too).

    Raises:
        TypeError: for anything else, naming what `obj` is and the supported families.
    """
    for candidate in _registry().values():
        models = candidate.models_of(obj)
        if models:
            return candidate, models[0][1]
    held = {a: getattr(obj, a, None) for a in ("transformer", "unet")}
    held = next(((a, m) for a, m in held.items() if isinstance(m, torch.nn.Module)), None)
    what = type(obj).__name__ + (f" (holding a {type(held[1]).__name__} as `{held[0]}`)" if held else "")
    raise TypeError(
        f"agentsd does not support {what}. It patches: {supported()}. Pass such a pipeline, or its "
        "`unet` / `transformer`."
    )
