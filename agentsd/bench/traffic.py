"""The elements each rank sends per layer and per forward under diffusers' context parallelism,
from the sizes alone: the baseline (diffusers' Ulysses or ring) and agentsd's two phases.

What is counted: the elements a rank hands to a collective (the numel of its input: an
all-to-all's whole input, of which 1/P stays on the rank; an all-gather's own part), per rank
and per call of the transformer, its whole batch and every head. With P ranks, a layer whose
rank holds S_l tokens (image tokens N_l and, for Flux, text tokens m_l = 512 / P), H heads of d
channels and a batch of B:

    Ulysses (exact)     4 B H S_l d        all-to-alls of the queries, keys, values and output
    ring (exact)        2 B H S_l d        one all-gather of the keys and values
    agentsd, agent      B H [(n_l + m_l) d + P n_l (d + 1) + P m_l (d + 1)]
                        every rank's n_l agents (and text queries) all-gathered; each rank's
                        partial outputs and log-sum-exps of all of them sent back
                        (`agentsd.core.sharded`)
    agentsd, ToMe       Ulysses or ring as above over the merged tokens: S_l = N'_l + m_l

A forward adds to its layers (Flux: every double- and single-stream block's attention; Wan: every
block's self-attention, its cross-attention is local) the gather of the output at the model's
end, B N_l C_out (C_out: `proj_out`'s channels per token), the same for every method.

The agent count n_l and the merged tokens N'_l are those of the shard-local plan: each rank
merges its own tokens by the preset's cells (Wan: the whole token frames of its run, as many on
every rank, `agentsd.families.wan.shard`, the cut frames around them sources; Flux: its whole
rows, rows / P x columns), as `agentsd.core.state` plans a grid. Where a Wan run holds no whole
frame, Flux's shards are not whole rows, or the plan runs exact attention, agentsd hands the
layer to diffusers and sends the baseline's elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.config import AgentSDConfig
from ..core.merge import merge_count
from ..core.plans import AGENT, EXACT, TOME
from ..families.base import ModelCall
from ..families.wan import shard as wan_shard
from .transformer_models import ALL_TRANSFORMERS, FLUX_TEXT_TOKENS, Size, sides, transformer_config
from .wan_models import token_grid

MODES = ("ulysses", "ring")


@dataclass(frozen=True)
class ShardPlan:
    """What a layer does on its shard in one phase: `action` (agent, tome or exact), with the agent
    count n_l (agent) and the merged tokens N'_l (agent and tome) of a rank."""

    action: str
    agents: int | None = None
    merged: int | None = None


EXACT_PLAN = ShardPlan(EXACT)


@dataclass(frozen=True)
class ShardLayout:
    """One rank's share of a transformer call under context parallelism over `ranks` ranks.

    Args:
        ranks: P.
        heads, head_dim: H and d of the attention.
        layers: the attention layers that attend across the ranks.
        tokens: N_l, the image (video) tokens of a rank.
        text: m_l, the text tokens of a rank in the same attention (Flux; Wan's text is not sharded).
        out_channels: C_out, what the output gather sends per token.
        grid: the rank's shard-local token grid (frames, rows, columns), or None where the shards
            are not whole frames or rows (agentsd then hands every layer to diffusers).
        plans: the shard-local plan of each agentsd method (`agentsd-agent`, `agentsd-tome`).
        batch: B.
    """

    ranks: int
    heads: int
    head_dim: int
    layers: int
    tokens: int
    text: int
    out_channels: int
    grid: tuple[int, int, int] | None
    plans: dict[str, ShardPlan]
    batch: int = 1

    def plan(self, method: str) -> ShardPlan:
        """What `method`'s layers do: the agentsd methods by their shard-local plan, the baseline exact."""
        return self.plans.get(method, EXACT_PLAN)

    def layer_elements(self, mode: str, plan: ShardPlan = EXACT_PLAN) -> int:
        """Elements a rank sends in one layer that runs `plan` under `mode` (ulysses or ring)."""
        if mode not in MODES:
            raise ValueError(f"unknown context-parallel mode {mode!r}: use one of {', '.join(MODES)}.")
        per_token = 4 if mode == "ulysses" else 2  # queries, keys, values, output / keys, values
        d, p, m = self.head_dim, self.ranks, self.text
        if plan.action == AGENT:
            n = plan.agents
            per_head = (n + m) * d + p * n * (d + 1) + p * m * (d + 1)
        elif plan.action == TOME:
            per_head = per_token * (plan.merged + m) * d
        else:
            per_head = per_token * (self.tokens + m) * d
        return self.batch * self.heads * per_head

    def forward_elements(self, mode: str, plan: ShardPlan = EXACT_PLAN) -> int:
        """Elements a rank sends in one forward: every layer, then the output gather."""
        return self.layers * self.layer_elements(mode, plan) + self.batch * self.tokens * self.out_channels


def shard_layout(
    arch: str, size: Size, frames: int | None, ranks: int, config: AgentSDConfig, batch: int = 1
) -> ShardLayout:
    """The `ShardLayout` of the benchmark's architecture `arch` (`NAME` or `NAME:K`) at `size`
    (and a video's `frames`) over `ranks` ranks, by the preset `config`.

    Raises:
        ValueError: for an architecture without context parallelism in diffusers (not Flux or Wan),
            or tokens that do not split into `ranks` equal shards.
    """
    name, _, depth = arch.partition(":")
    spec = ALL_TRANSFORMERS.get(name)
    if spec is None or spec.family not in ("flux", "wan"):
        raise ValueError(f"{arch}: the traffic formulas cover the Flux and Wan transformers only.")
    model = transformer_config(name, int(depth) if depth else None)
    height, width = sides(size)
    if spec.video:
        frames_total, rows, columns = token_grid(model, height, width, frames)
        layers, text = model["num_layers"], 0
        out_channels = model["out_channels"] * math.prod(model["patch_size"])
        total = frames_total * rows * columns
        local = wan_shard(ModelCall(None, 0.0, (frames_total, rows, columns)), ranks, 0)
        grid = None if isinstance(local, str) else local.grid
    else:
        rows = columns = height // 16  # the VAE's 8x and Flux's packed 2x2 patches
        layers, text = model["num_layers"] + model["num_single_layers"], FLUX_TEXT_TOKENS
        out_channels = (model.get("out_channels") or model["in_channels"]) * model["patch_size"] ** 2
        if text % ranks:
            raise ValueError(f"{arch}: {text} text tokens do not split over {ranks} ranks.")
        text //= ranks
        grid = (1, rows // ranks, columns) if rows % ranks == 0 else None
        total = rows * columns
    if total % ranks:
        raise ValueError(f"{arch} at {height}x{width}: {total} tokens do not split over {ranks} ranks.")
    plans = {}
    if grid is not None:
        c = config
        run = total // ranks
        plans["agentsd-agent"] = _plan(grid, run, (c.st, c.sy, c.sx), c.ratio, c.agent_ratio, c)
        plans["agentsd-tome"] = _plan(grid, run, (c.late_st, c.late_sy, c.late_sx), c.late_ratio, None, c)
    heads, head_dim = model["num_attention_heads"], model["attention_head_dim"]
    return ShardLayout(ranks, heads, head_dim, layers, total // ranks, text, out_channels, grid, plans, batch)


def _plan(
    grid: tuple[int, int, int],
    tokens: int,
    cells: tuple[int, int, int],
    ratio: float,
    agent_ratio: float | None,
    c: AgentSDConfig,
) -> ShardPlan:
    """A shard's plan as `AgentSDState` makes it for a grid within a rank's `tokens` (Wan: the cut
    frames around it are sources): one destination per whole box, N' after the ToMe merge, agent
    attention only where 2 n < N', exact where nothing merges."""
    frames, rows, columns = grid
    depth, cell_rows, cell_columns = min(cells[0], frames), cells[1], cells[2]
    if tokens < c.min_tokens or rows < cell_rows or columns < cell_columns:
        return EXACT_PLAN
    boxes = (frames // depth) * (rows // cell_rows) * (columns // cell_columns)
    r = merge_count(tokens - boxes, tokens, ratio)
    if agent_ratio is not None:
        agents = boxes if c.agent_selection == "pool" else tokens - merge_count(tokens - boxes, tokens, agent_ratio)
        if 2 * agents < tokens - r:
            return ShardPlan(AGENT, agents, tokens - r)
    return ShardPlan(TOME, None, tokens - r) if r else EXACT_PLAN
