"""The SD3 family: Stable Diffusion 3 and 3.5 (`SD3Transformer2DModel`).

Every block's joint attention (`transformer_blocks.{i}.attn`: image and text tokens together)
and, in SD 3.5's dual-attention blocks, the image-only `attn2`, within `config.block_range`. The
token grid of a call is the patch grid of its latent, `(H // patch, W // patch)`: the image
tokens in row-major order, as the model's patch embedding makes them. The pipelines pass the
timestep as a keyword, in [0, T] (flow matching: `sigma * 1000`).
"""

from __future__ import annotations

from typing import Any

from ..core.config import AgentSDConfig
from ..processors.joint_attention import JointAgentSDProcessor
from .base import Family, Layer, ModelCall

# The joint layer of each block, and SD 3.5's image-only one where the block has it.
ATTENTION_NAMES = ("attn", "attn2")


def blocks_in_range(blocks: Any, config: AgentSDConfig) -> list[tuple[int, Any]]:
    """The (index, block) pairs of `blocks` that `config.block_range` selects (all when None)."""
    indexed = list(enumerate(blocks))
    if config.block_range is None:
        return indexed
    start, stop = config.block_range
    return indexed[start:stop]


def layers(model: Any, config: AgentSDConfig) -> dict[str, Layer]:
    found = {}
    for i, block in blocks_in_range(model.transformer_blocks, config):
        for attr in ATTENTION_NAMES:
            module = getattr(block, attr, None)
            if module is not None and hasattr(module, "processor"):
                found[f"transformer_blocks.{i}.{attr}.processor"] = Layer(module, 1, block, JointAgentSDProcessor)
    return found


def patch_grid(model: Any, sample: Any) -> tuple[int, int]:
    """The patch grid of a latent (B, C, H, W): what the patch embedding's stride makes of it."""
    patch = model.config.patch_size
    return int(sample.shape[-2]) // patch, int(sample.shape[-1]) // patch


def read_call(model: Any, args: tuple, kwargs: dict) -> ModelCall:
    """`transformer(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)`."""
    sample = args[0] if args else kwargs["hidden_states"]
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[3]
    return ModelCall(sample, timestep, patch_grid(model, sample))


def nothing_patched(model: Any, config: AgentSDConfig) -> str:
    blocks = len(model.transformer_blocks)
    return f"block_range={config.block_range} selects none of this transformer's {blocks} blocks (0 to {blocks - 1})"


FAMILY = Family(
    name="sd3",
    models="Stable Diffusion 3 / 3.5 transformers (SD3Transformer2DModel)",
    attribute="transformer",
    model_class="SD3Transformer2DModel",
    layers=layers,
    read_call=read_call,
    nothing_patched=nothing_patched,
    preset="sd3",
)
