"""The SD3 joint-attention processor computes agentsd on joint attention: compared with the plain
float64 reference in reference_joint.py (itself checked against diffusers in
test_reference_joint.py). Skipped until `agentsd.processors.joint_attention` exists."""

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from reference import check_one_per_whole_cell, top_left_destinations
from reference_joint import reference_joint_attention
from test_reference_joint import CALLS, DIM, make_joint_attention

import agentsd.core.state
from agentsd import AgentSDConfig
from agentsd.core.state import AgentSDState

JointAgentSDProcessor = pytest.importorskip("agentsd.processors.joint_attention").JointAgentSDProcessor

AGENT_T, LATE_T = 999, 100  # progress 0.001 (agent phase) and 0.9 (ToMe-only phase) of T = 1000
TOLERANCE = 1e-4  # relative, fp32 processor against the float64 reference

CASES = [
    # (h, w, sx, sy): the patch grid and the agent phase's cells, divisible and not
    (16, 16, 4, 4),
    (10, 13, 4, 4),
    (9, 7, 2, 2),
    (9, 7, 3, 2),
    (6, 17, 3, 2),
]


def make(kind="joint", qk_norm="rms_norm", seed=0):
    """An fp32 SD3-style attention module (see test_reference_joint.make_joint_attention)."""
    return make_joint_attention(kind, qk_norm, seed=seed).float()


def text(attn, batch, length=7):
    return torch.randn(batch, length, attn.add_k_proj.in_features)


def phase_cells(config, timestep):
    return (config.sx, config.sy) if timestep == AGENT_T else (config.late_sx, config.late_sy)


def run_joint_processor(attn, x, c, h, w, config, timestep, monkeypatch):
    """Run the joint processor as the patched SD3 transformer would, on an h x w patch grid.
    Returns the image output, the text output (None when the processor returned the image alone)
    and the destinations the reference uses: without randomness (`use_rand` off), the test's own
    top-left ones of the phase's cells; with it, the processor's draw,
    once checked to hold one token of every whole cell of the phase's cell size."""
    drawn = []
    fixed = agentsd.core.state.destination_indices

    def recording(*args, **kwargs):
        drawn.append(fixed(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(agentsd.core.state, "destination_indices", recording)
    # The grids here are under the default min_tokens floor: the algorithm tests switch it off.
    state = AgentSDState(config.replace(min_tokens=0))
    attn.set_processor(JointAgentSDProcessor(JointAttnProcessor2_0(), state, "attn"))
    state.begin_call(torch.zeros(x.shape[0], 4, h, w), torch.tensor(timestep))
    with torch.no_grad():
        out = attn(hidden_states=x, encoder_hidden_states=c)
    if c is None:
        assert isinstance(out, torch.Tensor), "without text the processor returns the image output alone"
        image, text_out = out, None
    else:
        assert isinstance(out, tuple) and len(out) == 2, "with text the processor returns (image, text)"
        image, text_out = out
    assert len(drawn) == 1, "one destination draw per layer and call"
    sx, sy = phase_cells(config, timestep)
    if config.use_rand:
        check_one_per_whole_cell(drawn[0], h, w, sx, sy)
        return image, text_out, drawn[0]
    return image, text_out, top_left_destinations(h, w, sx, sy)


def relative_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def check_against_reference(attn, x, c, h, w, config, timestep, monkeypatch):
    """The processor's outputs against the reference with the phase's settings; returns whether
    the reference used agents."""
    image, text_out, dst = run_joint_processor(attn, x, c, h, w, config, timestep, monkeypatch)
    if timestep == AGENT_T:
        ratio, agent_ratio = config.ratio, config.agent_ratio
    else:
        ratio, agent_ratio = config.late_ratio, None
    pool_cells = (h, w, *phase_cells(config, timestep)) if config.agent_selection == "pool" else None
    ref_image, ref_text, used_agents = reference_joint_attention(
        attn, x, c, dst, ratio, agent_ratio, config.k_scale2, config.k_shortcut, pool_cells=pool_cells
    )
    assert image.shape == ref_image.shape and image.dtype == x.dtype
    assert relative_error(image, ref_image) <= TOLERANCE
    if c is not None:
        assert text_out.shape == ref_text.shape
        assert relative_error(text_out, ref_text) <= TOLERANCE
    return used_agents


@pytest.mark.parametrize("grid", CASES)
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("use_rand", [False, True])
@pytest.mark.parametrize("timestep", [AGENT_T, LATE_T], ids=["agent", "tome"])
def test_phases_match_reference(grid, batch, use_rand, timestep, monkeypatch):
    """SD3's joint attention (RMS QK norm, text): agents in the agent phase (they pay on every
    grid here), ToMe on the late cells in the ToMe-only phase."""
    h, w, sx, sy = grid
    config = AgentSDConfig(sx=sx, sy=sy, use_rand=use_rand, seed=3)
    attn = make(seed=1)
    x = torch.randn(batch, h * w, DIM)
    used_agents = check_against_reference(attn, x, text(attn, batch), h, w, config, timestep, monkeypatch)
    assert used_agents == (timestep == AGENT_T)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("kind, with_text", CALLS)
@pytest.mark.parametrize("timestep", [AGENT_T, LATE_T], ids=["agent", "tome"])
def test_module_variants_match_reference(kind, with_text, qk_norm, timestep, monkeypatch):
    """With and without QK norm and text, context_pre_only (text returned unprojected), another
    text width, and SD 3.5's image-only attn2."""
    config = AgentSDConfig(use_rand=True, seed=4)
    attn = make(kind, qk_norm, seed=2)
    x = torch.randn(2, 10 * 13, DIM)
    c = text(attn, 2) if with_text else None
    check_against_reference(attn, x, c, 10, 13, config, timestep, monkeypatch)


@pytest.mark.parametrize("grid", CASES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("with_text", [True, False])
def test_pooled_agents_match_reference(grid, batch, with_text, monkeypatch):
    h, w, sx, sy = grid
    config = AgentSDConfig(sx=sx, sy=sy, agent_selection="pool", use_rand=True, seed=5)
    attn = make(seed=3)
    x = torch.randn(batch, h * w, DIM)
    c = text(attn, batch) if with_text else None
    assert check_against_reference(attn, x, c, h, w, config, AGENT_T, monkeypatch)
    # Pooling is a different method from matched agents (on the top-left cells: one draw only).
    dst = top_left_destinations(h, w, sx, sy)
    pooled, _, _ = reference_joint_attention(attn, x, c, dst, 0.4, 0.95, 0.3, 0.075, pool_cells=(h, w, sx, sy))
    matched, _, _ = reference_joint_attention(attn, x, c, dst, 0.4, 0.95, 0.3, 0.075)
    assert relative_error(matched, pooled) > 1e-3


@pytest.mark.parametrize("with_text", [True, False])
def test_agents_that_do_not_pay_fall_back_to_tome(with_text, monkeypatch):
    """2x2 cells, agent_ratio 0.5: n = N / 2 agents is not under half of N' = 0.6 N."""
    config = AgentSDConfig(sx=2, sy=2, ratio=0.4, agent_ratio=0.5, use_rand=False)
    attn = make(seed=4)
    x = torch.randn(2, 64, DIM)
    c = text(attn, 2) if with_text else None
    assert not check_against_reference(attn, x, c, 8, 8, config, AGENT_T, monkeypatch)


def test_text_tokens_do_not_count_in_the_agent_decision(monkeypatch):
    """8x8 grid, 2x2 cells, agent_ratio 0.75 (n = 16) and 40 text tokens: ratio 0.5 gives
    N' = 32 = 2 n image tokens, ToMe mode (even though N' + L > 2 n); ratio 0.48, N' = 34: agents."""
    config = AgentSDConfig(sx=2, sy=2, ratio=0.5, agent_ratio=0.75, use_rand=False)
    attn = make(seed=5)
    x = torch.randn(2, 64, DIM)
    c = text(attn, 2, length=40)
    assert not check_against_reference(attn, x, c, 8, 8, config, AGENT_T, monkeypatch)
    assert check_against_reference(attn, x, c, 8, 8, config.replace(ratio=0.48), AGENT_T, monkeypatch)


@pytest.mark.parametrize("with_text", [True, False])
def test_agents_without_merging(with_text, monkeypatch):
    """ratio 0: every image token is a query, key and value; the text stays exact attention."""
    config = AgentSDConfig(ratio=0.0, use_rand=False, k_scale2=0.5, k_shortcut=0.2)
    attn = make(seed=6)
    x = torch.randn(2, 144, DIM)
    c = text(attn, 2) if with_text else None
    assert check_against_reference(attn, x, c, 12, 12, config, AGENT_T, monkeypatch)


@pytest.mark.parametrize("with_text", [True, False])
def test_late_ratio_zero_is_diffusers_joint_attention(with_text, monkeypatch):
    """Nothing merged in the ToMe-only phase: diffusers' own joint attention."""
    attn = make(seed=7)
    x = torch.randn(2, 256, DIM)
    c = text(attn, 2) if with_text else None
    with torch.no_grad():
        expected = attn(hidden_states=x, encoder_hidden_states=c)
    image, text_out, _ = run_joint_processor(attn, x, c, 16, 16, AgentSDConfig(late_ratio=0.0), LATE_T, monkeypatch)
    if with_text:
        assert relative_error(image, expected[0].double()) <= 1e-5
        assert relative_error(text_out, expected[1].double()) <= 1e-5
    else:
        assert relative_error(image, expected.double()) <= 1e-5


@pytest.mark.parametrize("precision, expected", [(None, torch.bfloat16), ("fp32", torch.float32)])
@pytest.mark.parametrize("timestep", [AGENT_T, LATE_T], ids=["agent", "tome"])
def test_softmax_precision(precision, expected, timestep, sdpa_dtypes, monkeypatch):
    """A bf16 joint layer (it has no upcast flags): `attn_precision="fp32"` runs every softmax in
    fp32 (the agents' gathering, the image queries' broadcast, the text queries' exact attention;
    the ToMe phase's one attention), None keeps bf16; the outputs are bf16 either way."""
    config = AgentSDConfig(attn_precision=precision, use_rand=False)
    attn = make(seed=8).to(torch.bfloat16)
    x, c = torch.randn(2, 256, DIM).to(torch.bfloat16), text(attn, 2).to(torch.bfloat16)
    image, text_out, dst = run_joint_processor(attn, x, c, 16, 16, config, timestep, monkeypatch)
    assert len(sdpa_dtypes) == (3 if timestep == AGENT_T else 1)  # agentsd's own attention ran
    assert all(dtypes == (expected,) * 3 for dtypes in sdpa_dtypes)
    assert image.dtype == text_out.dtype == torch.bfloat16
    assert torch.isfinite(image).all() and torch.isfinite(text_out).all()
    if timestep == AGENT_T:  # the ToMe phase's bf16 matching may rank near-ties otherwise than in fp64
        settings = (config.ratio, config.agent_ratio, config.k_scale2, config.k_shortcut)
        ref_image, ref_text, _ = reference_joint_attention(attn.float(), x.float(), c.float(), dst, *settings)
        assert relative_error(image.float(), ref_image) <= 0.1  # bf16 projections and merges
        assert relative_error(text_out.float(), ref_text) <= 0.1
