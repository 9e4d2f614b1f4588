"""Token merging by bipartite matching on a token grid: rows x columns, or frames x rows x columns.

A merge is one index map: for each of the N tokens, the slot it occupies in the merged
sequence. Merging averages the tokens that share a slot (a destination and every source
merged into it); unmerging gives every token its slot's value. The same map serves both,
so merge and unmerge never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def destination_indices(
    h: int, w: int, sx: int, sy: int, generator: torch.Generator | None = None, frames: int = 1, st: int = 1
) -> torch.Tensor:
    """Flat positions of the destination tokens of a frames x h x w grid (frame-major, then
    row-major; an image is one frame).

    One destination per whole st x sy x sx box: its first token (first frame, top-left) when
    `generator` is None, otherwise a uniformly drawn token of the box (one draw per box). Tokens
    of partial boxes at the last frames, the bottom and the right are never destinations.

    Returns:
        A CPU int64 tensor of `(frames // st) * (h // sy) * (w // sx)` positions in increasing box
        order.
    """
    gf, gh, gw = frames // st, h // sy, w // sx
    if generator is None:
        offset = torch.zeros(gf, gh, gw, dtype=torch.long)
    else:
        offset = torch.randint(st * sy * sx, (gf, gh, gw), generator=generator, device=generator.device).cpu()
    depth, within = offset // (sy * sx), offset % (sy * sx)
    frame = torch.arange(gf).view(-1, 1, 1) * st + depth
    rows = torch.arange(gh).view(1, -1, 1) * sy + within // sx
    cols = torch.arange(gw).view(1, 1, -1) * sx + within % sx
    return ((frame * h + rows) * w + cols).flatten()


def merge_count(num_src: int, num_tokens: int, ratio: float) -> int:
    """How many of `num_src` sources a merge at `ratio` takes: `min(num_src, floor(N * ratio))`."""
    return min(num_src, math.floor(num_tokens * ratio))


def source_indices(num_tokens: int, dst: torch.Tensor) -> torch.Tensor:
    """The positions not in `dst`, in increasing order."""
    is_src = torch.ones(num_tokens, dtype=torch.bool, device=dst.device)
    is_src[dst] = False
    return is_src.nonzero().flatten()


def cell_means(x: torch.Tensor, h: int, w: int, sx: int, sy: int, frames: int = 1, st: int = 1) -> torch.Tensor:
    """(B, frames * h * w, C) -> (B, (frames // st) * (h // sy) * (w // sx), C): the mean of every
    whole st x sy x sx box.

    Boxes in frame-major, row-major order; tokens of partial boxes at the last frames, the bottom
    and the right are left out, as they are never destinations.
    """
    batch, _, channels = x.shape
    gf, gh, gw = frames // st, h // sy, w // sx
    boxes = x.view(batch, frames, h, w, channels)[:, : gf * st, : gh * sy, : gw * sx]
    boxes = boxes.reshape(batch, gf, st, gh, sy, gw, sx, channels)
    return boxes.mean(dim=(2, 4, 6)).reshape(batch, gf * gh * gw, channels)


@dataclass
class Matching:
    """Every source token's most similar destination and that similarity.

    Attributes:
        dst: (num_dst,) destination positions.
        src: (num_src,) source positions.
        best_dst: (B, num_src) index into `dst` of each source's best destination.
        best_score: (B, num_src) the cosine similarity to it.
    """

    dst: torch.Tensor
    src: torch.Tensor
    best_dst: torch.Tensor
    best_score: torch.Tensor

    def merge_count(self, num_tokens: int, ratio: float) -> int:
        """Sources merged at `ratio` (see `merge_count`)."""
        return merge_count(self.src.numel(), num_tokens, ratio)

    def plan(self, r: int) -> TokenMerge:
        """The merge of the `r` best-matched sources into their destinations.

        Merged order: the unmerged sources (by position), then the destinations. Only the
        set of the `r` best matters, so a top-k replaces a full sort.
        """
        batch, num_src = self.best_dst.shape
        num_dst = self.dst.numel()
        device = self.best_dst.device
        if r >= num_src:  # every source merges (the agent merge of the paper's agent phase)
            merged = torch.ones(batch, num_src, dtype=torch.bool, device=device)
        else:
            merged = torch.zeros(batch, num_src, dtype=torch.bool, device=device)
            merged.scatter_(1, self.best_score.topk(r, dim=-1).indices, True)
        unmerged_slot = (~merged).cumsum(dim=1) - 1
        src_slot = torch.where(merged, num_src - r + self.best_dst, unmerged_slot)
        index = torch.empty(batch, num_src + num_dst, dtype=torch.long, device=device)
        index[:, self.src] = src_slot
        index[:, self.dst] = torch.arange(num_src - r, num_src - r + num_dst, device=device)
        return TokenMerge(index=index, size=num_src + num_dst - r)


def bipartite_matching(x: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> Matching:
    """Match every source token of `x` (B, N, C) to its most cosine-similar destination.

    Only the destinations are normalized before the product: dividing a source's row of
    scores by its norm does not change which destination is best, so the sources' norms
    are applied to the best scores alone (a full normalize of x costs as much as the
    product's operand gathers).
    """
    sources = x.index_select(1, src)
    scores = sources @ F.normalize(x.index_select(1, dst), dim=-1).transpose(1, 2)
    best, best_dst = scores.max(dim=-1)
    best_score = best / sources.norm(dim=-1).clamp_min(1e-12)
    return Matching(dst=dst, src=src, best_dst=best_dst, best_score=best_score)


@dataclass
class TokenMerge:
    """A merge of N tokens into `size` slots.

    Attributes:
        index: (B, N) slot of every token.
        size: number of slots N'.
    """

    index: torch.Tensor
    size: int

    def __post_init__(self) -> None:
        # Slot of every token among the B * N' rows of the flattened merged batch, and the
        # reciprocal of each slot's token count (plain tensors: no lazy attributes, which
        # would break a torch.compile graph).
        batch, device = self.index.shape[0], self.index.device
        offsets = torch.arange(batch, device=device).unsqueeze(1) * self.size
        self.flat_index = (self.index + offsets).flatten()
        counts = torch.zeros(batch * self.size, device=device)
        counts.index_add_(0, self.flat_index, torch.ones(self.flat_index.numel(), device=device))
        self.inverse_counts = counts.reciprocal().unsqueeze(-1)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N', C): the mean of the tokens in each slot."""
        batch, _, channels = x.shape
        # index_add_ over the flattened batch is an order of magnitude faster on the CPU than
        # scatter_reduce(mean) and gives the same sums. Scaled in place: a second buffer of the
        # merged size is a fresh allocation, whose page faults dominate on the CPU (one thread,
        # 2 x 4096 tokens of 1536 channels: 33 ms per merge with it, 8 ms without); same values.
        sums = x.new_zeros(batch * self.size, channels).index_add_(0, self.flat_index, x.reshape(-1, channels))
        return sums.mul_(self.inverse_counts.to(x.dtype)).view(batch, self.size, channels)

    def representatives(self, dst: torch.Tensor) -> torch.Tensor:
        """(B, N') the token each slot stands for: its destination where it has one (every slot
        holding a merged source does), else the one token in it. Where a token's position
        matters after merging (Flux's rotary angles), a slot takes its representative's."""
        batch, num_tokens = self.index.shape
        tokens = torch.arange(num_tokens, device=self.index.device).expand(batch, -1)
        slots = self.index.new_empty(batch, self.size)
        slots.scatter_(1, self.index, tokens)  # some token of each slot; destinations win below
        return slots.scatter_(1, self.index[:, dst], dst.expand(batch, -1))

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N', C) -> (B, N, C): every token gets the value of its slot."""
        # Whole-row index_select over the flattened batch: on the CPU about 10x faster than a
        # gather with an index expanded over the channels, with the same result.
        batch, _, channels = y.shape
        return y.reshape(-1, channels).index_select(0, self.flat_index).view(batch, -1, channels)
