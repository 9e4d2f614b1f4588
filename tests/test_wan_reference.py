"""The Wan processor computes agentsd on Wan's video self-attention: compared with the plain float64
reference in reference_wan.py, itself checked first against diffusers' own `WanAttnProcessor`
where agentsd must be exact (nothing merged). Grids with whole boxes only, with partial boxes on
every side (frames, rows, columns), a video shorter than the box depth; agent and ToMe phases;
matched and pooled agents; destinations the reference's own (randomness off) or drawn and checked
one per whole box by the reference."""

import pytest

wan = pytest.importorskip("diffusers.models.transformers.transformer_wan")

import torch  # noqa: E402
from reference_wan import reference_wan_self_attention  # noqa: E402

from agentsd.core.config import AgentSDConfig  # noqa: E402
from agentsd.core.state import AgentSDState  # noqa: E402
from agentsd.processors.wan_attention import WanAgentSDProcessor  # noqa: E402

DIM, HEADS, HEAD_DIM = 24, 2, 12
TOLERANCE = 1e-4  # relative, the fp32 processor against the float64 reference
RATIO, AGENT_RATIO = 0.4, 0.9
LAYER = "blocks.0.attn1.processor"
# (frames, rows, columns) and the configured (st, sy, sx): whole boxes only; partial boxes on every
# side; a one-frame video under 2-frame boxes (cells as deep as the video); 1 x 2 x 2 boxes.
GRIDS = [((5, 8, 8), (2, 4, 4)), ((3, 6, 10), (2, 4, 4)), ((1, 8, 8), (2, 4, 4)), ((4, 4, 6), (1, 2, 2))]


def make_wan_attention(seed=0):
    """A self-attention built as a Wan block builds its `attn1`, with random weights (RMS norm
    weights around 1), in eval mode."""
    torch.manual_seed(seed)
    attn = wan.WanAttention(dim=DIM, heads=HEADS, dim_head=HEAD_DIM, eps=1e-6, processor=wan.WanAttnProcessor())
    for name, param in attn.named_parameters():
        torch.nn.init.normal_(param, mean=1.0 if name.startswith("norm") else 0.0, std=0.3)
    return attn.eval()


def wan_rotary(grid):
    """diffusers' Wan rotary table for a frames x rows x columns token grid: what the transformer
    passes its blocks, (1, N, 1, head_dim) each."""
    f, h, w = grid
    rope = wan.WanRotaryPosEmbed(HEAD_DIM, (1, 2, 2), max_seq_len=32)
    return rope(torch.zeros(1, 16, f, 2 * h, 2 * w))


def run_processor(attn, x, rotary, grid, config):
    state = AgentSDState(config)
    attn.set_processor(WanAgentSDProcessor(attn.processor, state, LAYER))
    call = state.begin_call(x, 500.0, grid=grid)
    with torch.no_grad():
        out = attn(x, None, None, rotary)
    return out, call


def relative_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("grid", [(5, 8, 8), (3, 6, 10)], ids=str)
def test_reference_is_diffusers_when_nothing_merges(grid):
    """ratio 0 in the ToMe-only phase: the reference is Wan's attention itself."""
    attn = make_wan_attention().double()
    x = torch.randn(2, grid[0] * grid[1] * grid[2], DIM, dtype=torch.float64)
    rotary = wan_rotary(grid)
    with torch.no_grad():
        expected = attn(x, None, None, rotary)
    ref, used = reference_wan_self_attention(attn, x, rotary, grid, (2, 4, 4), ratio=0.0, agent_ratio=None)
    assert not used
    assert torch.allclose(ref, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("selection", ["match", "pool"])
@pytest.mark.parametrize("mode", ["agent", "tome"])
@pytest.mark.parametrize("grid, cells", GRIDS, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("batch", [1, 2])
def test_processor_matches_reference(batch, grid, cells, mode, selection):
    st, sy, sx = cells
    config = AgentSDConfig(
        ratio=RATIO, agent_ratio=AGENT_RATIO, sx=sx, sy=sy, st=st, late_ratio=RATIO, late_sx=sx, late_sy=sy,
        late_st=st, agent_steps=1.0 if mode == "agent" else 0.0, use_rand=False, min_tokens=0,
        agent_selection=selection,
    )  # fmt: skip
    attn = make_wan_attention()
    x = torch.randn(batch, grid[0] * grid[1] * grid[2], DIM)
    rotary = wan_rotary(grid)
    out, call = run_processor(attn, x, rotary, grid, config)
    depth = min(st, grid[0])  # a video shorter than the boxes gets boxes as deep as the video
    ref, used = reference_wan_self_attention(
        attn, x, rotary, grid, (depth, sy, sx), RATIO, AGENT_RATIO if mode == "agent" else None, selection=selection
    )
    assert used == (mode == "agent"), "these grids are chosen so that agents pay"
    assert call.modes() == {LAYER: mode}
    assert relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize("grid, cells", GRIDS[:2], ids=lambda g: "x".join(map(str, g)))
def test_drawn_destinations_are_one_per_box_and_match_the_reference(grid, cells):
    """With randomness on, the reference checks the drawn destinations (one per whole box) and
    computes everything else itself from them."""
    st, sy, sx = cells
    config = AgentSDConfig(ratio=RATIO, agent_ratio=AGENT_RATIO, sx=sx, sy=sy, st=st, agent_steps=1.0, min_tokens=0)
    attn = make_wan_attention(1)
    x = torch.randn(2, grid[0] * grid[1] * grid[2], DIM)
    rotary = wan_rotary(grid)
    out, call = run_processor(attn, x, rotary, grid, config)
    dst = call.plans[LAYER].dst
    ref, used = reference_wan_self_attention(attn, x, rotary, grid, cells, RATIO, AGENT_RATIO, dst=dst)
    assert used and relative_error(out, ref) < TOLERANCE


def test_a_grid_without_a_whole_box_runs_wan_exactly_and_says_why():
    """3 rows cannot hold a 4-row box: the layer hands the call to Wan's processor, bit for bit."""
    grid = (4, 3, 8)
    attn = make_wan_attention()
    x = torch.randn(1, 96, DIM)
    rotary = wan_rotary(grid)
    with torch.no_grad():
        expected = attn(x, None, None, rotary)
    out, call = run_processor(attn, x, rotary, grid, AgentSDConfig(sx=4, sy=4, st=2, agent_steps=1.0, min_tokens=0))
    assert torch.equal(out, expected)
    assert call.plans[LAYER] is None
    assert call.reasons[LAYER] == "grid 4x3x8 holds no whole 2x4x4 (frames x rows x columns) box"
