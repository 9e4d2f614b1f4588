"""The model families agentsd patches, one small module each.

A family says three things of its diffusers model, and nothing else differs between them:
which attention layers agentsd patches (and with which processor), how a model call gives the
latent, the timestep and the token grid, and where a pipeline keeps the model. The algorithm
(merging, agent attention, the per-call plans) is shared and family-blind.

    unet    UNet2DConditionModel: Stable Diffusion 1.x, 2.x, XL (`families/unet.py`)
    sd3     SD3Transformer2DModel: Stable Diffusion 3 / 3.5 (`families/sd3.py`)
    pixart  PixArtTransformer2DModel: PixArt-alpha, PixArt-Sigma (`families/pixart.py`)
    flux    FluxTransformer2DModel: Flux.1 (`families/flux.py`)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import AgentSDConfig
from ..state import Sequence


@dataclass(frozen=True)
class Layer:
    """An attention layer a family patches.

    Args:
        module: the diffusers attention module.
        downsample: its level's downsampling relative to the token grid of a model call (1 for
            every layer of a diffusion transformer).
        block: the transformer block holding it (where another token-merging patch would act).
        processor: the agentsd processor class that wraps its processor.
    """

    module: torch.nn.Module
    downsample: int
    block: torch.nn.Module
    processor: type


@dataclass(frozen=True)
class ModelCall:
    """What a model call gives the per-call plan: the latent input (its batch and device), the
    timestep, the token grid at downsample 1 (None: the latent's own sides), and where the grid's
    tokens sit in the layers' sequences (None: they are the whole sequence)."""

    sample: torch.Tensor
    timestep: Any
    grid: tuple[int, int] | None = None
    sequence: Sequence | None = None


@dataclass(frozen=True)
class Family:
    """One kind of model.

    Args:
        name: short name (`unet`, `sd3`, `pixart`).
        models: what it covers, in words, for messages.
        attribute: where a pipeline holds the model (`unet`, `transformer`).
        model_class: the diffusers class name of the model.
        layers: the layers to patch under a config: `{processor name: Layer}`.
        read_call: a model call's `ModelCall`, from the model and the forward's args and kwargs.
        nothing_patched: why `layers` found nothing, for the warning (given the model and config).
        preset: the preset the command line uses for it when none is named.
        noun: what its model is called in reports ("UNet", "transformer").
    """

    name: str
    models: str
    attribute: str
    model_class: str
    layers: Callable[[Any, AgentSDConfig], dict[str, Layer]]
    read_call: Callable[[Any, tuple, dict], ModelCall]
    nothing_patched: Callable[[Any, AgentSDConfig], str]
    preset: str = "paper"
    noun: str = "transformer"

    def holds(self, model: Any) -> bool:
        """Whether `model` is this family's model (in the installed diffusers)."""
        import diffusers

        cls = getattr(diffusers, self.model_class, None)
        return cls is not None and isinstance(model, cls)


def _registry() -> dict[str, Family]:
    from . import flux, pixart, sd3, unet

    return {family.name: family for family in (unet.FAMILY, sd3.FAMILY, pixart.FAMILY, flux.FAMILY)}


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
        model = getattr(obj, candidate.attribute, obj)
        model = getattr(model, "_orig_mod", model)  # a torch.compile'd model
        if candidate.holds(model):
            return candidate, model
    held = {a: getattr(obj, a, None) for a in ("transformer", "unet")}
    held = next(((a, m) for a, m in held.items() if isinstance(m, torch.nn.Module)), None)
    what = type(obj).__name__ + (f" (holding a {type(held[1]).__name__} as `{held[0]}`)" if held else "")
    raise TypeError(
        f"agentsd does not support {what}. It patches: {supported()}. Pass such a pipeline, or its "
        "`unet` / `transformer`."
    )
