"""Property-based tests of the merge and the processor over random grids, strides and ratios."""

import math

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from hypothesis import given, settings
from hypothesis import strategies as st

from agentsd import AgentSDConfig
from agentsd.core.merge import bipartite_matching, destination_indices, source_indices
from agentsd.processors.self_attention import AgentSDProcessor, AgentSDState

grids = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.integers(1, 4))


@settings(max_examples=60, deadline=None)
@given(grid=grids, batch=st.integers(1, 3), ratio=st.floats(0, 0.99), seed=st.integers(0, 2**16))
def test_merge_counts_shapes_and_group_constant_roundtrip(grid, batch, ratio, seed):
    h, w, sx, sy = grid
    n = h * w
    dst = destination_indices(h, w, sx, sy, torch.Generator().manual_seed(seed))
    assert dst.numel() == (h // sy) * (w // sx) and len(set(dst.tolist())) == dst.numel()
    if dst.numel() == 0:
        return
    torch.manual_seed(seed)
    x = torch.randn(batch, n, 5)
    matching = bipartite_matching(x, dst, source_indices(n, dst))
    r = matching.merge_count(n, ratio)
    assert r == min(n - dst.numel(), math.floor(n * ratio))
    merge = matching.plan(r)
    merged = merge.merge(x)
    assert merged.shape == (batch, n - r, 5) and merge.unmerge(merged).shape == x.shape
    # Every slot is used; a field constant within each merge group survives merge + unmerge.
    assert all(set(row.tolist()) == set(range(n - r)) for row in merge.index)
    field = torch.randn(batch, n - r, 3).gather(1, merge.index.unsqueeze(-1).expand(-1, -1, 3))
    assert torch.allclose(merge.unmerge(merge.merge(field)), field, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    grid=grids,
    batch=st.integers(1, 3),
    agent_phase=st.booleans(),
    fill=st.sampled_from(["random", "zeros", "constant"]),
)
def test_processor_preserves_shape_and_stays_finite(grid, batch, agent_phase, fill):
    h, w, sx, sy = grid
    config = AgentSDConfig(sx=sx, sy=sy, late_sx=sx, late_sy=sy, late_ratio=0.4, min_tokens=0)
    attn = Attention(16, heads=2, dim_head=8).eval()
    x = {"random": torch.randn, "zeros": torch.zeros, "constant": torch.ones}[fill](batch, h * w, 16)
    state = AgentSDState(config)
    attn.set_processor(AgentSDProcessor(AttnProcessor2_0(), state, "attn1"))
    state.begin_call(torch.zeros(batch, 4, h, w), torch.tensor(999 if agent_phase else 100))
    with torch.no_grad():
        out = attn(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
