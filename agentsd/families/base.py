"""What every model family states (`Family`), and the layers and calls it describes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.config import AgentSDConfig
from ..core.state import Sequence


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
    timestep, the token grid at downsample 1 (None: the latent's own sides; a video's is frames x
    rows x columns), and where the grid's tokens sit in the layers' sequences (None: they are the
    whole sequence)."""

    sample: torch.Tensor
    timestep: Any
    grid: tuple[int, ...] | None = None
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
        experts: further attributes where a pipeline may hold more models of the family that one
            patch covers with one state (Wan 2.2 A14B's `transformer_2`).
        shard: under context parallelism over `ranks` ranks, the call as the layers of rank `rank`
            see it (its shard-local grid, `Sequence.ranks` set; the grid's shape the same on every
            rank), or why agentsd cannot act on the shards; None: the family's layers hand
            sharded calls to diffusers.
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
    experts: tuple[str, ...] = ()
    shard: Callable[[ModelCall, int, int], ModelCall | str] | None = None

    def models_of(self, obj: Any) -> list[tuple[str, torch.nn.Module]]:
        """(attribute, model) of every model of this family `obj` holds, in `attribute`, then
        `experts` order (torch.compile'd ones unwrapped); `obj` itself as ("", obj) when it is one."""
        if self.holds(_unwrapped(obj)):
            return [("", _unwrapped(obj))]
        found = [(a, _unwrapped(getattr(obj, a, None))) for a in (self.attribute, *self.experts)]
        return [(a, m) for a, m in found if self.holds(m)]

    def holds(self, model: Any) -> bool:
        """Whether `model` is this family's model (in the installed diffusers)."""
        import diffusers

        cls = getattr(diffusers, self.model_class, None)
        return cls is not None and isinstance(model, cls)


def _unwrapped(model: Any) -> Any:
    """The model a torch.compile'd model wraps; anything else as it is."""
    return getattr(model, "_orig_mod", model)
