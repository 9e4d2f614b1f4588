"""The PixArt family: PixArt-alpha and PixArt-Sigma (`PixArtTransformer2DModel`).

The self-attention (`attn1`) of every transformer block within `config.block_range`; the
cross-attention to the text (`attn2`) is left alone. The token grid of a call is the patch grid
of its latent, and the pipelines pass the timestep as a keyword (training timesteps in [0, T]).
"""

from __future__ import annotations

from typing import Any

from ..core.config import AgentSDConfig
from ..processors.self_attention import AgentSDProcessor
from .base import Family, Layer, ModelCall
from .sd3 import blocks_in_range, nothing_patched, patch_grid


def layers(model: Any, config: AgentSDConfig) -> dict[str, Layer]:
    return {
        f"transformer_blocks.{i}.attn1.processor": Layer(block.attn1, 1, block, AgentSDProcessor)
        for i, block in blocks_in_range(model.transformer_blocks, config)
    }


def read_call(model: Any, args: tuple, kwargs: dict) -> ModelCall:
    """`transformer(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs, ...)`."""
    sample = args[0] if args else kwargs["hidden_states"]
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[2]
    return ModelCall(sample, timestep, patch_grid(model, sample))


FAMILY = Family(
    name="pixart",
    models="PixArt-alpha / PixArt-Sigma transformers (PixArtTransformer2DModel)",
    attribute="transformer",
    model_class="PixArtTransformer2DModel",
    layers=layers,
    read_call=read_call,
    nothing_patched=nothing_patched,
    preset="pixart",
)
