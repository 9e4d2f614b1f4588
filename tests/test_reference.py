"""The processor computes ALGORITHM.md: compared with the plain reference in reference.py."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from reference import check_one_per_whole_cell, reference_self_attention, top_left_destinations

import agentsd.core.attention
import agentsd.core.state
from agentsd import AgentSDConfig
from agentsd.processors.self_attention import AgentSDProcessor, AgentSDState

AGENT_T, LATE_T = 999, 100  # progress 0.001 (agent phase) and 0.9 (ToMe-only phase)


def make_attention(dim=32, heads=2, seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, out_bias=True)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return attn.eval()


def run_processor(attn, x, h, w, config, timestep, monkeypatch, downsample=1, latent=None):
    """Run the processor as the patched UNet would, on the h x w grid of a layer at `downsample`
    (of `latent`, h x w by default). Returns its output and the destinations the reference
    uses: without randomness (`use_rand` off), the test's own top-left ones of
    the phase's cells; with it, the processor's draw, once checked to hold one token of every
    whole cell of the phase's cell size."""
    drawn = []
    fixed = agentsd.core.state.destination_indices

    def recording(*args, **kwargs):
        drawn.append(fixed(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(agentsd.core.state, "destination_indices", recording)
    # Most grids here are under the default min_tokens floor: the algorithm tests switch it off.
    state = AgentSDState(config.replace(min_tokens=0, max_downsample=max(downsample, config.max_downsample)))
    attn.set_processor(AgentSDProcessor(AttnProcessor2_0(), state, "attn1", downsample))
    state.begin_call(torch.zeros(x.shape[0], 4, *(latent or (h, w))), torch.tensor(timestep))
    with torch.no_grad():
        out = attn(x)
    assert len(drawn) == 1, "one destination draw per layer and UNet call"
    sx, sy = (config.sx, config.sy) if timestep == AGENT_T else (config.late_sx, config.late_sy)
    if config.use_rand:
        check_one_per_whole_cell(drawn[0], h, w, sx, sy)
        return out, drawn[0]
    return out, top_left_destinations(h, w, sx, sy)


def relative_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


CASES = [
    # (h, w, sx, sy), divisible and not
    (16, 16, 4, 4),
    (10, 13, 4, 4),
    (9, 7, 2, 2),
    (6, 17, 3, 2),
]


@pytest.mark.parametrize("grid", CASES)
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("use_rand", [False, True])
def test_agent_phase_matches_reference(grid, batch, use_rand, monkeypatch):
    h, w, sx, sy = grid
    config = AgentSDConfig(sx=sx, sy=sy, use_rand=use_rand, seed=3)
    attn = make_attention()
    x = torch.randn(batch, h * w, 32)
    out, dst = run_processor(attn, x, h, w, config, AGENT_T, monkeypatch)
    ref, used_agents = reference_self_attention(attn, x, dst, 0.4, 0.95, 0.3, 0.075)
    assert used_agents
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "einsum"])
def test_explicit_backends_match_reference(backend, monkeypatch):
    config = AgentSDConfig(use_rand=False, attention_backend=backend)
    attn = make_attention(seed=8)
    x = torch.randn(2, 160, 32)
    out, dst = run_processor(attn, x, 10, 16, config, AGENT_T, monkeypatch)
    ref, used_agents = reference_self_attention(attn, x, dst, 0.4, 0.95, 0.3, 0.075)
    assert used_agents
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("grid", CASES)
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("use_rand", [False, True])
def test_tome_phase_matches_reference(grid, batch, use_rand, monkeypatch):
    """The ToMe-only phase merges on its own cells (late_sx x late_sy), not the agent phase's."""
    h, w, _, _ = grid
    config = AgentSDConfig(sx=4, sy=4, late_sx=2, late_sy=2, late_ratio=0.4, use_rand=use_rand, seed=2)
    attn = make_attention(seed=1)
    x = torch.randn(batch, h * w, 32)
    out, dst = run_processor(attn, x, h, w, config, LATE_T, monkeypatch)
    ref, used_agents = reference_self_attention(attn, x, dst, 0.4, None, 0.3, 0.075)
    assert not used_agents
    assert relative_error(out, ref) <= 1e-5


def test_agent_phase_falls_back_to_tome_when_agents_do_not_pay(monkeypatch):
    # 2x2 cells, agent_ratio 0.5: n = N/2 agents is not under half of N' = 0.6 N.
    config = AgentSDConfig(sx=2, sy=2, ratio=0.4, agent_ratio=0.5, use_rand=False)
    attn = make_attention(seed=2)
    x = torch.randn(2, 64, 32)
    out, dst = run_processor(attn, x, 8, 8, config, AGENT_T, monkeypatch)
    ref, used_agents = reference_self_attention(attn, x, dst, 0.4, 0.5, 0.3, 0.075)
    assert not used_agents
    assert relative_error(out, ref) <= 1e-5


def test_agents_without_merging(monkeypatch):
    # ratio 0: queries, keys and values are all N tokens; the agents still come from merging.
    config = AgentSDConfig(ratio=0.0, use_rand=False, k_scale2=0.5, k_shortcut=0.2)
    attn = make_attention(seed=4)
    x = torch.randn(2, 144, 32)
    out, dst = run_processor(attn, x, 12, 12, config, AGENT_T, monkeypatch)
    ref, used_agents = reference_self_attention(attn, x, dst, 0.0, 0.95, 0.5, 0.2)
    assert used_agents
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize(
    "precision, upcast, expected",
    [
        (None, None, torch.bfloat16),
        ("fp32", None, torch.float32),
        (None, "upcast_attention", torch.float32),
        (None, "upcast_softmax", torch.float32),
    ],
)
@pytest.mark.parametrize("timestep", [AGENT_T, LATE_T], ids=["agent", "tome"])
def test_softmax_precision(precision, upcast, expected, timestep, sdpa_dtypes, monkeypatch):
    """fp32 softmaxes when asked, or when the layer upcasts (SD 2.x), in both phases; bf16 out
    either way."""
    config = AgentSDConfig(attn_precision=precision, use_rand=False)
    attn = make_attention(seed=5).to(torch.bfloat16)
    if upcast is not None:
        setattr(attn, upcast, True)
    x = torch.randn(2, 256, 32).to(torch.bfloat16)
    out, dst = run_processor(attn, x, 16, 16, config, timestep, monkeypatch)
    assert sdpa_dtypes and all(dtypes == (expected,) * 3 for dtypes in sdpa_dtypes)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    if timestep == AGENT_T:  # the ToMe phase's bf16 matching may rank near-ties otherwise than in fp64
        ref, _ = reference_self_attention(attn.float(), x.float(), dst, 0.4, 0.95, 0.3, 0.075)
        assert relative_error(out.float(), ref) <= 0.1  # bf16 projections and merges


def test_calls_it_does_not_handle_go_to_the_original_processor():
    torch.manual_seed(0)
    attn = make_attention(seed=6)
    x = torch.randn(2, 256, 32)
    with torch.no_grad():
        expected_plain = attn(x)
        mask = torch.zeros(2, 1, 256)
        expected_masked = attn(x, attention_mask=mask)
        context = torch.randn(2, 5, 32)
        expected_cross = attn(x, encoder_hidden_states=context)

    state = AgentSDState(AgentSDConfig(max_downsample=1))
    attn.set_processor(AgentSDProcessor(AttnProcessor2_0(), state, "attn1", downsample=1))
    beyond = AgentSDProcessor(AttnProcessor2_0(), state, "deeper", downsample=2)
    # The latent is 32x32: the layer expects 1024 tokens and gets 256, so it is not acting.
    state.begin_call(torch.zeros(2, 4, 32, 32), torch.tensor(AGENT_T))
    assert state.plans["deeper"] is None  # a level beyond max_downsample never acts
    with torch.no_grad():
        assert torch.equal(attn(x), expected_plain)
        assert torch.equal(beyond(attn, x), expected_plain)
        state.begin_call(torch.zeros(2, 4, 16, 16), torch.tensor(AGENT_T))
        assert not torch.equal(attn(x), expected_plain)
        assert torch.equal(attn(x, attention_mask=mask), expected_masked)
        assert torch.equal(attn(x, encoder_hidden_states=context), expected_cross)


def test_late_ratio_zero_runs_exact_attention():
    attn = make_attention(seed=7)
    x = torch.randn(2, 256, 32)
    with torch.no_grad():
        expected = attn(x)
    state = AgentSDState(AgentSDConfig(late_ratio=0.0))
    attn.set_processor(AgentSDProcessor(AttnProcessor2_0(), state, "attn1"))
    state.begin_call(torch.zeros(2, 4, 16, 16), torch.tensor(LATE_T))
    with torch.no_grad():
        assert torch.equal(attn(x), expected)


def test_xformers_backend_gets_its_layout_and_the_explicit_scale(monkeypatch):
    """xformers takes (B, tokens, heads, dim); a stand-in module checks what it receives."""
    import sys
    import types

    received = []

    def memory_efficient_attention(q, k, v, scale):
        received.append((q.shape, scale))
        weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale, dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", weights, v)

    fake = types.ModuleType("xformers")
    fake.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    q, k, v, a = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8), torch.randn(2, 3, 5, 8)
    out = agentsd.core.attention.agent_attention(q, k, v, a, 8**-0.5, 0.3, 0.075, backend="xformers")
    expected = agentsd.core.attention.agent_attention(q, k, v, a, 8**-0.5, 0.3, 0.075, backend="sdpa")
    assert [shape for shape, _ in received] == [(2, 5, 3, 8), (2, 40, 3, 8)]
    assert [s for _, s in received] == pytest.approx([8**-0.5, 8**-0.15])
    assert torch.allclose(out, expected, atol=1e-5)


# Opt-in options that change outputs: each against the reference with the same option.


def count_matchings(monkeypatch):
    calls = []
    matching = agentsd.processors.self_attention.bipartite_matching

    def counting(*args, **kwargs):
        calls.append(1)
        return matching(*args, **kwargs)

    monkeypatch.setattr(agentsd.processors.self_attention, "bipartite_matching", counting)
    return calls


@pytest.mark.parametrize("grid", CASES)
@pytest.mark.parametrize("batch", [1, 2])
def test_pooled_agents_match_reference(grid, batch, monkeypatch):
    h, w, sx, sy = grid
    config = AgentSDConfig(sx=sx, sy=sy, agent_selection="pool", use_rand=True, seed=5)
    attn = make_attention(seed=9)
    x = torch.randn(batch, h * w, 32)
    out, dst = run_processor(attn, x, h, w, config, AGENT_T, monkeypatch)
    ref, used_agents = reference_self_attention(attn, x, dst, 0.4, 0.95, 0.3, 0.075, pool_cells=(h, w, sx, sy))
    assert used_agents
    assert relative_error(out, ref) <= 1e-5
    match_ref, _ = reference_self_attention(attn, x, dst, 0.4, 0.95, 0.3, 0.075)
    assert relative_error(match_ref.float(), ref) > 1e-3  # pooling is a different method


def test_pooled_agents_without_merging_skip_the_matching(monkeypatch):
    calls = count_matchings(monkeypatch)
    config = AgentSDConfig(ratio=0.0, agent_selection="pool", use_rand=False)
    attn = make_attention(seed=10)
    x = torch.randn(2, 12 * 16, 32)
    out, dst = run_processor(attn, x, 12, 16, config, AGENT_T, monkeypatch)
    ref, used_agents = reference_self_attention(attn, x, dst, 0.0, 0.95, 0.3, 0.075, pool_cells=(12, 16, 4, 4))
    assert used_agents and not calls
    assert relative_error(out, ref) <= 1e-5


def test_shared_matching_reuses_the_first_layers_merges(monkeypatch):
    """Two layers of one grid: the second attends its own input through the merges matched on
    the first layer's input; the next UNet call matches anew."""
    calls = count_matchings(monkeypatch)
    drawn = []
    fixed = agentsd.core.state.destination_indices
    monkeypatch.setattr(agentsd.core.state, "destination_indices", lambda *a: drawn.append(fixed(*a)) or drawn[-1])
    state = AgentSDState(AgentSDConfig(share_matching=True, seed=1, min_tokens=0))
    first, second = make_attention(seed=11), make_attention(seed=12)
    first.set_processor(AgentSDProcessor(AttnProcessor2_0(), state, "a"))
    second.set_processor(AgentSDProcessor(AttnProcessor2_0(), state, "b"))
    x1, x2 = torch.randn(2, 160, 32), torch.randn(2, 160, 32)
    for timestep in (AGENT_T, LATE_T):
        calls.clear()
        drawn.clear()
        state.begin_call(torch.zeros(2, 4, 10, 16), torch.tensor(timestep))
        with torch.no_grad():
            out1, out2 = first(x1), second(x2)
        agent_ratio = 0.95 if timestep == AGENT_T else None
        dst = drawn[0]  # layer "a" is planned first (plans are made in name order)
        cells = (4, 4) if timestep == AGENT_T else (2, 2)
        check_one_per_whole_cell(dst, 10, 16, *cells)
        ref1, _ = reference_self_attention(first, x1, dst, 0.4, agent_ratio, 0.3, 0.075)
        ref2, _ = reference_self_attention(second, x2, dst, 0.4, agent_ratio, 0.3, 0.075, match_x=x1)
        assert len(calls) == 1
        assert relative_error(out1, ref1) <= 1e-5
        assert relative_error(out2, ref2) <= 1e-5


@pytest.mark.parametrize("min_tokens, acts", [(161, False), (160, True)])
def test_grids_under_min_tokens_run_the_original_processor(min_tokens, acts):
    attn = make_attention(seed=13)
    x = torch.randn(2, 160, 32)
    with torch.no_grad():
        expected = attn(x)
    state = AgentSDState(AgentSDConfig(min_tokens=min_tokens))
    attn.set_processor(AgentSDProcessor(AttnProcessor2_0(), state, "attn1"))
    state.begin_call(torch.zeros(2, 4, 10, 16), torch.tensor(AGENT_T))
    with torch.no_grad():
        assert torch.equal(attn(x), expected) != acts


def test_agents_exactly_half_of_the_merged_tokens_fall_back_to_tome(monkeypatch):
    """The boundary 2 n == N': 8x8 grid, 2x2 cells (16 destinations, 48 sources), ratio 0.5
    (N' = 64 - 32 = 32) and agent_ratio 0.75 (n = 64 - 48 = 16): agents are used only when
    2 n < N', so this layer runs exact attention over the merged tokens."""
    config = AgentSDConfig(sx=2, sy=2, ratio=0.5, agent_ratio=0.75, use_rand=False)
    attn = make_attention(seed=14)
    x = torch.randn(2, 64, 32)
    out, dst = run_processor(attn, x, 8, 8, config, AGENT_T, monkeypatch)
    ref, used_agents = reference_self_attention(attn, x, dst, 0.5, 0.75, 0.3, 0.075)
    assert not used_agents
    assert relative_error(out, ref) <= 1e-5
    # Two tokens fewer merged (N' = 34 > 2 n): agents.
    out, dst = run_processor(attn, x, 8, 8, config.replace(ratio=0.48), AGENT_T, monkeypatch)
    ref, used_agents = reference_self_attention(attn, x, dst, 0.48, 0.75, 0.3, 0.075)
    assert used_agents
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("phase_t", [AGENT_T, LATE_T], ids=["agent", "tome"])
def test_fused_projections_are_used_and_match_reference(phase_t, monkeypatch):
    """After `fuse_qkv_projections` the processor served projects with the fused `to_qkv`; agentsd
    does too (one product for q, k, v; the query rows of its weights for the agents)."""
    from diffusers.models import attention_processor

    FusedAttnProcessor2_0 = getattr(attention_processor, "FusedAttnProcessor2_0", None)
    if FusedAttnProcessor2_0 is None:
        pytest.skip("this diffusers has no fused QKV projections (no FusedAttnProcessor2_0)")
    attn = make_attention(seed=15)
    attn.fuse_projections()
    used = []
    attn.to_qkv.register_forward_hook(lambda *_: used.append(1))
    config = AgentSDConfig(use_rand=False, min_tokens=0)
    state = AgentSDState(config)
    attn.set_processor(AgentSDProcessor(FusedAttnProcessor2_0(), state, "attn1"))
    x = torch.randn(2, 256, 32)
    state.begin_call(torch.zeros(2, 4, 16, 16), torch.tensor(phase_t))
    with torch.no_grad():
        out = attn(x)
    assert used
    dst = top_left_destinations(16, 16, 4, 4) if phase_t == AGENT_T else top_left_destinations(16, 16, 2, 2)
    agent_ratio = 0.95 if phase_t == AGENT_T else None
    ref, _ = reference_self_attention(attn, x, dst, 0.4, agent_ratio, 0.3, 0.075)
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("timestep", [AGENT_T, LATE_T], ids=["agent", "tome"])
def test_a_downsampled_level_of_an_odd_latent_plans_on_the_rounded_up_grid(timestep, monkeypatch):
    """A 9x5 latent at downsample 2 is a 5x3 token grid (sides rounded up, as the UNet's strided
    convolutions do): the layer plans on it and acts, rather than handing its calls over."""
    config = AgentSDConfig(sx=2, sy=2, use_rand=False)
    attn = make_attention(seed=16)
    x = torch.randn(2, 5 * 3, 32)
    out, dst = run_processor(attn, x, 5, 3, config, timestep, monkeypatch, downsample=2, latent=(9, 5))
    agent_ratio = 0.95 if timestep == AGENT_T else None
    ref, _ = reference_self_attention(attn, x, dst, 0.4, agent_ratio, 0.3, 0.075)
    assert relative_error(out, ref) <= 1e-5
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        assert relative_error(attn(x), ref) > 1e-3  # not exact attention


@pytest.mark.parametrize("timestep", [AGENT_T, LATE_T], ids=["agent", "tome"])
def test_residual_connection_and_output_rescaling_apply(timestep, monkeypatch):
    """Layers built with `residual_connection` and `rescale_output_factor` (diffusers applies
    them in the processor) get both on agentsd's output too."""
    torch.manual_seed(17)
    attn = Attention(query_dim=32, heads=2, dim_head=16, out_bias=True, residual_connection=True,
                     rescale_output_factor=2.5)  # fmt: skip
    for param in attn.parameters():
        torch.nn.init.normal_(param, std=0.2)
    x = torch.randn(2, 256, 32)
    config = AgentSDConfig(use_rand=False)
    out, dst = run_processor(attn.eval(), x, 16, 16, config, timestep, monkeypatch)
    agent_ratio = 0.95 if timestep == AGENT_T else None
    ref, _ = reference_self_attention(attn, x, dst, 0.4, agent_ratio, 0.3, 0.075)
    assert relative_error(out, ref) <= 1e-5
