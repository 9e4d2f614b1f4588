"""The Wan family: Wan 2.1 and 2.2 video transformers (`WanTransformer3DModel`).

The self-attention of every block (`blocks.{i}.attn1`: the video tokens) within
`config.block_range`; the cross-attention to the text (`attn2`, with an I2V model's image keys)
stays exact. The pipelines: `WanPipeline` (text-to-video, and Wan 2.2's TI2V 5B),
`WanImageToVideoPipeline`, `WanVideoToVideoPipeline`, where the installed diffusers has them.
Wan 2.2 A14B holds two experts, `transformer` (the noisier steps) and `transformer_2`: one
patch covers both, with one state, so the schedule reads one progress across the hand-over at
the pipeline's `boundary_ratio`.

What a transformer call gives the plan:
- the grid: the latent (B, C, frames, height, width) in the transformer's `patch_size` (Wan:
  1 x 2 x 2) patches, frame-major, as its patch embedding flattens them; read from the call,
  never guessed (Wan 2.2 5B's VAE compresses 16x in space, its transformer still 2x);
- under context parallelism, each rank's run of the video tokens as a grid of whole frames (`shard`);
- the timestep: the pipelines pass training timesteps in [0, 1000] (flow matching: sigma * 1000),
  one per sample; Wan 2.2 5B's pipeline passes one per token (B, tokens), 0 on the tokens of a
  conditioning first frame: the call's timestep is then its largest, the noise level of the
  frames being generated.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..core.config import AgentSDConfig
from ..core.plans import Sequence
from ..processors.wan_attention import WanAgentSDProcessor, wan_attention_class
from .base import Family, Layer, ModelCall
from .sd3 import blocks_in_range


def layers(model: Any, config: AgentSDConfig) -> dict[str, Layer]:
    attention = wan_attention_class()
    if attention is None or not isinstance(model.blocks[0].attn1, attention):
        import diffusers

        raise TypeError(
            f"agentsd patches Wan through diffusers' WanAttention (diffusers 0.35 and later); the installed "
            f"diffusers {diffusers.__version__} builds Wan without it. Upgrade diffusers: pip install -U diffusers."
        )
    return {
        f"blocks.{i}.attn1.processor": Layer(block.attn1, 1, block, WanAgentSDProcessor)
        for i, block in blocks_in_range(model.blocks, config)
    }


def read_call(model: Any, args: tuple, kwargs: dict) -> ModelCall:
    """`transformer(hidden_states, timestep, encoder_hidden_states, ...)`, as Wan pipelines call it."""
    names = ("hidden_states", "timestep")
    given = dict(zip(names, args, strict=False)) | {k: kwargs[k] for k in names if k in kwargs}
    sample, timestep = given["hidden_states"], given["timestep"]
    if isinstance(timestep, torch.Tensor) and timestep.ndim == 2:  # one per token (Wan 2.2 5B)
        timestep = timestep.amax(dim=1)
    p_t, p_h, p_w = model.config.patch_size
    frames, height, width = sample.shape[-3:]
    return ModelCall(sample, timestep, (frames // p_t, height // p_h, width // p_w))


def shard(call: ModelCall, ranks: int, rank: int) -> ModelCall | str:
    """diffusers splits Wan's video tokens (not its text) into `ranks` equal runs, frame-major. Each
    rank's layers see its run as a grid of whole token frames, as deep on every rank (the fewest
    any run holds: the collectives need equal shapes), with the run's other tokens, cut frames
    (and the whole frames beyond that depth), before it (`lead`) and after it (`tail`): those are
    merged as sources, never destinations, so boxes never cross a cut."""
    frames, rows, columns = call.grid
    per_frame = rows * columns
    run, cut = divmod(frames * per_frame, ranks)
    if cut:
        return f"context parallelism over {ranks} ranks: {frames * per_frame} video tokens do not split evenly"

    def whole_frames(r: int) -> tuple[int, int]:  # (first whole frame of run r, how many)
        first = -(-(r * run) // per_frame)
        return first, max(0, (r + 1) * run // per_frame - first)

    depth = min(whole_frames(r)[1] for r in range(ranks))
    if depth == 0:
        return (
            f"context parallelism over {ranks} ranks: a run of {run} tokens holds no whole token frame of "
            f"{rows}x{columns} on some rank, so diffusers attends exactly across the shards"
        )
    lead = whole_frames(rank)[0] * per_frame - rank * run
    local = Sequence(ranks=ranks, lead=lead, tail=run - lead - depth * per_frame)
    return replace(call, grid=(depth, rows, columns), sequence=local)


def nothing_patched(model: Any, config: AgentSDConfig) -> str:
    blocks = len(model.blocks)
    return f"block_range={config.block_range} selects none of this transformer's {blocks} blocks (0 to {blocks - 1})"


FAMILY = Family(
    name="wan",
    models="Wan 2.1 / 2.2 video transformers (WanTransformer3DModel; Wan 2.2 A14B's two experts)",
    attribute="transformer",
    model_class="WanTransformer3DModel",
    layers=layers,
    read_call=read_call,
    nothing_patched=nothing_patched,
    preset="wan",
    experts=("transformer_2",),
    shard=shard,
)
