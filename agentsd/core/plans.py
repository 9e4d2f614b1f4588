"""What one model call decides: the phase, and each layer's plan (mode, grid, cells, positions,
merge sizes). `AgentSDState.begin_call` makes them (`agentsd.core.state`); the processors read them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .merge import TokenMerge

AGENT = "agent"
TOME = "tome"
EXACT = "exact"
CACHED = "cached"  # the layer did not run in the call: a step cache skipped its block
COMPUTED = "computed"  # a model call in which every patched layer ran
SKIPPED = "skipped"  # a model call in which a step cache skipped the blocks of some patched layers

# Why a layer runs exact attention in a call (the first word of the reason it reports).
SMALL_GRID = "grid"  # fewer tokens than min_tokens, or no whole cell: the image is too small there
BY_DESIGN = "late_ratio=0"  # the ToMe phase merges nothing: exact attention is the setting


@dataclass(frozen=True)
class PhaseSettings:
    """Merge settings of one phase; `agent_ratio` is None in the ToMe-only phase."""

    sx: int
    sy: int
    ratio: float
    agent_ratio: float | None
    st: int = 1


@dataclass
class LayerPlan:
    """What one layer does in one model call: the mode, the grid and its cells, the destination
    and source positions, the merge sizes (`r` ToMe-merged, `r_agent` merged into agents) and
    whether the agents are cell means (`pool`) rather than a merge. A video grid has `f` frames
    and cells `st` frames deep; an image grid one frame. `lead` and `tail` tokens before and after
    the grid (a shard's cut frames, see `Sequence`) are sources: the positions count them."""

    mode: str
    h: int
    w: int
    sx: int
    sy: int
    dst: torch.Tensor
    src: torch.Tensor
    r: int
    r_agent: int
    pool: bool = False
    f: int = 1
    st: int = 1
    lead: int = 0
    tail: int = 0

    @property
    def tokens(self) -> int:
        """N: the layer's tokens, the grid's (frames x rows x columns) and any lead and tail."""
        return self.lead + self.f * self.h * self.w + self.tail

    @property
    def matches(self) -> bool:
        """Whether this plan needs the bipartite matching (a merge, or agents by merging)."""
        return self.r > 0 or (self.mode == AGENT and not self.pool)

    @property
    def merged_tokens(self) -> int:
        """N': the tokens attention runs over after the ToMe merge."""
        return self.tokens - self.r

    @property
    def agents(self) -> int | None:
        """n: the agent count in the agent mode, else None."""
        if self.mode != AGENT:
            return None
        return self.dst.numel() if self.pool else self.tokens - self.r_agent


@dataclass(frozen=True)
class Sequence:
    """Where the image grid's tokens sit in what a layer is given, when that is not the grid
    alone (Flux): `text` text tokens before them where a layer gets the text and the image in
    one sequence (its single-stream blocks), `extra` tokens after them that are never merged
    (a Kontext reference image); `unfit` says why the image tokens do not form the grid (every
    layer then runs exact attention); `ranks` > 1: the grid is one rank's shard under context
    parallelism, the same on every rank (`agentsd.core.sharded`); `lead` and `tail`: a shard's
    tokens before and after its grid of whole frames, where the rank's run of tokens cuts frames
    (Wan): part of the layer's tokens, merged as sources, never destinations."""

    text: int = 0
    extra: int = 0
    unfit: str | None = None
    ranks: int = 1
    lead: int = 0
    tail: int = 0


@dataclass
class CallPlan:
    """One UNet call: its latent size (a transformer's: its token grid, `token_grid`), phase,
    every patched layer's plan (None: the layer hands the call to its original processor, for
    `reasons[name]`), the layers whose call was handed over at run time and why, the merges shared
    by the layers of a grid (`share_matching`), and where the grid's tokens sit in the layers'
    sequences."""

    latent_hw: tuple[int, int]
    agent_phase: bool
    plans: dict[str, LayerPlan | None]
    reasons: dict[str, str]
    sequence: Sequence = Sequence()
    handed_over: dict[str, str] = field(default_factory=dict)
    shared: dict[tuple[int, int], tuple[TokenMerge | None, TokenMerge | None]] = field(default_factory=dict)
    counted: bool = False
    token_grid: bool = False
    frames: int | None = None
    # The layers whose processor ran in the call (a step cache may skip the blocks of the others),
    # and those expected to: every planned layer agentsd's processor serves.
    ran: set[str] = field(default_factory=set)
    expected: frozenset[str] = frozenset()

    @property
    def sides(self) -> tuple[int, ...]:
        """The grid's sides at downsample 1: (rows, columns), or a video's (frames, rows, columns)."""
        return self.latent_hw if self.frames is None else (self.frames, *self.latent_hw)

    @property
    def size(self) -> str:
        """What `sides` measures, in words: "latent 64x64", "token grid 16x16", or a video's
        "token grid 5x30x52" (frames x rows x columns)."""
        return f"{'token grid' if self.token_grid else 'latent'} {'x'.join(map(str, self.sides))}"

    @property
    def phase(self) -> str:
        return AGENT if self.agent_phase else TOME

    def modes(self) -> dict[str, str]:
        """What each patched layer did: agent, tome or exact."""
        return {
            name: EXACT if plan is None or name in self.handed_over else plan.mode for name, plan in self.plans.items()
        }

    def cached(self) -> set[str]:
        """The layers expected to run whose processor never ran in the call (a step cache skipped
        their block); meaningful once the call is over."""
        return set(self.expected - self.ran)

    def outcomes(self, ended: bool = True) -> dict[str, str]:
        """What each patched layer did: its mode, or `CACHED` where a step cache skipped its block
        (told only of a call that is over: `ended`)."""
        cached = self.cached() if ended else set()
        return {name: CACHED if name in cached else mode for name, mode in self.modes().items()}

    @property
    def acting(self) -> bool:
        """Whether some layer ran agent attention or token merging."""
        return any(mode != EXACT for mode in self.modes().values())
