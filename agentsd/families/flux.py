"""The Flux family: Flux.1 dev / schnell and the pipelines built on them (`FluxTransformer2DModel`).

The attention of every double-stream block (`transformer_blocks.{i}.attn`: image and text, each
with its projections) and every single-stream block (`single_transformer_blocks.{i}.attn`: text
and image in one sequence), within `config.block_range` counted over the double-stream blocks
first, then the single-stream ones (Flux.1: 19 + 38 = 57 blocks).

What a transformer call gives the plan:
- the timestep: Flux pipelines pass `t / 1000` (sigma, under flow matching) and the transformer
  multiplies it by 1000; so does this family, so the schedule reads the same progress as SD 3's;
- the grid: packed latents hold one token per 2x2 latent patch, and `img_ids` gives each token's
  (stream, row, column). The image's tokens are the leading run with the first token's stream id,
  and must be the rows x columns grid in row-major order; tokens after them (Kontext's
  reference image) are never merged. Anything else runs exact attention, with the reason;
- the text length: the single-stream layers are given [text; image] and not told where the text
  ends, so it is the length of the call's `encoder_hidden_states`.

Under context parallelism diffusers splits the text and the image tokens each into equal runs, one
per rank: agentsd acts on the shards when every run of the image holds whole grid rows and no
tokens follow the grid (`shard`); otherwise its layers hand the calls to diffusers, with the reason.

Reading `img_ids` copies it to the host: one small copy per transformer call, in the forward
pre-hook, outside any compiled graph.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..core.config import AgentSDConfig
from ..core.state import Sequence
from ..processors.flux_attention import FluxAgentSDProcessor, flux_attention_class
from .base import Family, Layer, ModelCall
from .sd3 import blocks_in_range


def _blocks(model: Any) -> list[tuple[str, Any]]:
    """(name prefix, block) of the double-stream blocks, then the single-stream ones."""
    double = [(f"transformer_blocks.{i}", b) for i, b in enumerate(model.transformer_blocks)]
    single = [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(model.single_transformer_blocks)]
    return double + single


def layers(model: Any, config: AgentSDConfig) -> dict[str, Layer]:
    attention = flux_attention_class()
    if attention is None or not isinstance(model.transformer_blocks[0].attn, attention):
        import diffusers

        raise TypeError(
            f"agentsd patches Flux through diffusers' FluxAttention (diffusers 0.35 and later); the installed "
            f"diffusers {diffusers.__version__} builds Flux without it. Upgrade diffusers: pip install -U diffusers."
        )
    found = {}
    for _, (prefix, block) in blocks_in_range(_blocks(model), config):
        found[f"{prefix}.attn.processor"] = Layer(block.attn, 1, block, FluxAgentSDProcessor)
    return found


def grid_of(img_ids: torch.Tensor) -> tuple[tuple[int, int] | None, int, str | None]:
    """The image grid in `img_ids` (N, 3): ((rows, columns), tokens after it, None), or
    (None, 0, why) when the leading tokens are not a row-major grid."""
    ids = img_ids.detach().to("cpu")
    ids = ids[0] if ids.ndim == 3 else ids  # the deprecated batched form
    stream = ids[:, 0] == ids[0, 0]
    count = int(stream.long().cumprod(0).sum())
    rows, cols = ids[:count, 1].round().long(), ids[:count, 2].round().long()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    expected_rows = torch.arange(h).repeat_interleave(w)
    if h * w != count or not (torch.equal(rows, expected_rows) and torch.equal(cols, torch.arange(w).repeat(h))):
        return None, 0, f"the image's {count} img_ids are not a row-major grid from (0, 0)"
    return (h, w), ids.shape[0] - count, None


def read_call(model: Any, args: tuple, kwargs: dict) -> ModelCall:
    """`transformer(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
    txt_ids, ...)`, as Flux pipelines call it (keywords)."""
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids")
    given = dict(zip(names, args, strict=False)) | {k: kwargs[k] for k in names if k in kwargs}
    sample, text = given["hidden_states"], given.get("encoder_hidden_states")
    timestep = given["timestep"]
    timestep = timestep * 1000 if isinstance(timestep, torch.Tensor) else float(timestep) * 1000
    text_len = 0 if text is None else int(text.shape[1])
    img_ids = given.get("img_ids")
    if img_ids is None:
        return ModelCall(sample, timestep, (0, 0), Sequence(text_len, 0, "the call gives no img_ids"))
    grid, extra, unfit = grid_of(img_ids)
    if grid is None or grid[0] * grid[1] + extra != sample.shape[1]:
        unfit = unfit or f"{sample.shape[1]} image tokens, but img_ids describe {img_ids.shape[-2]}"
        return ModelCall(sample, timestep, (0, 0), Sequence(text_len, 0, unfit))
    return ModelCall(sample, timestep, grid, Sequence(text_len, extra))


def shard(call: ModelCall, ranks: int, rank: int) -> ModelCall | str:
    """diffusers splits Flux's image tokens and its text tokens each into `ranks` equal runs: with
    whole grid rows per rank, each rank's layers see (text / ranks) text tokens and a
    (rows / ranks) x columns grid."""
    (rows, columns), sequence = call.grid, call.sequence
    why = None
    if sequence.extra:
        why = f"the {sequence.extra} tokens after the grid (a reference image) share the image's runs"
    elif rows % ranks:
        why = f"the {rows} token rows do not split into whole rows per rank"
    elif sequence.text % ranks:
        why = f"the {sequence.text} text tokens do not split evenly"
    if why is not None:
        return f"context parallelism over {ranks} ranks: {why}, so diffusers attends exactly across the shards"
    local = replace(sequence, text=sequence.text // ranks, ranks=ranks)
    return replace(call, grid=(rows // ranks, columns), sequence=local)


def nothing_patched(model: Any, config: AgentSDConfig) -> str:
    blocks = len(_blocks(model))
    return (
        f"block_range={config.block_range} selects none of this transformer's {blocks} blocks "
        f"(0 to {blocks - 1}: the double-stream blocks first, then the single-stream ones)"
    )


FAMILY = Family(
    name="flux",
    models="Flux.1 transformers (FluxTransformer2DModel)",
    attribute="transformer",
    model_class="FluxTransformer2DModel",
    layers=layers,
    read_call=read_call,
    nothing_patched=nothing_patched,
    preset="flux",
    shard=shard,
)
