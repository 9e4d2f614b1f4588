"""The Flux processor computes agentsd on Flux's attention: compared with the plain float64
reference in reference_flux.py (itself checked against diffusers in test_reference_flux.py), on
double- and single-stream layers, with and without Kontext's extra tokens, in the agent phase and
the ToMe-only phase, with matched and pooled agents. The destinations are the reference's own
(the top-left token of every whole cell, randomness off), never read from the processor.
Skipped until `agentsd.processors.flux_attention` exists."""

import pytest

FluxAgentSDProcessor = pytest.importorskip("agentsd.processors.flux_attention").FluxAgentSDProcessor

import torch  # noqa: E402
from reference import top_left_destinations  # noqa: E402
from reference_flux import reference_flux_double, reference_flux_single  # noqa: E402
from test_reference_flux import STREAMS, TEXT, layer_inputs, make_flux_attention  # noqa: E402

from agentsd.core.config import AgentSDConfig  # noqa: E402
from agentsd.core.state import AgentSDState, Sequence  # noqa: E402

TOLERANCE = 1e-4  # relative, fp32 processor against the float64 reference
GRIDS = [(6, 6, 2, 2), (5, 7, 2, 2), (8, 8, 4, 2)]  # (h, w, sx, sy): divisible, not, non-square cells
# Agents pay on every grid here, matched or pooled: 2 n < N' (6x6: n = 9 < 11; 5x7: n = 9 < 10.5,
# pooled 6; 8x8 in 4x2 cells: n = 16 < 19.5, pooled 8); the agent test asserts they were used.
RATIO, AGENT_RATIO, K_SCALE2, K_SHORTCUT = 0.4, 0.75, 0.3, 0.075
LAYER = {"double": "transformer_blocks.0.attn.processor", "single": "single_transformer_blocks.0.attn.processor"}


def run_processor(stream, attn, x, c, rotary, h, w, extra, config):
    """Patch `attn` with agentsd's Flux processor and run it as the Flux transformer would: one
    call planned on an h x w patch grid with TEXT text tokens and `extra` extra ones. Returns
    (image, text) on the double stream, the unprojected sequence on the single one."""
    state = AgentSDState(config)
    attn.set_processor(FluxAgentSDProcessor(attn.processor, state, LAYER[stream]))
    state.begin_call(x, 500.0, grid=(h, w), sequence=Sequence(text=TEXT, extra=extra))
    with torch.no_grad():
        if stream == "double":
            out = attn(hidden_states=x, encoder_hidden_states=c, image_rotary_emb=rotary)
            assert isinstance(out, tuple) and len(out) == 2, "a double-stream layer returns (image, text)"
            return out
        return attn(hidden_states=x, image_rotary_emb=rotary)


def relative_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("selection", ["match", "pool"])
@pytest.mark.parametrize("mode", ["agent", "tome"])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "{}x{}-cells{}x{}".format(*g))
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("stream", STREAMS)
def test_processor_matches_reference(stream, extra, batch, grid, mode, selection):
    """agent_steps 1.0 runs the agent phase, 0.0 the ToMe-only phase (whose late_* settings are
    set to the agent phase's, so both modes merge the same grid at the same ratio)."""
    h, w, sx, sy = grid
    config = AgentSDConfig(
        ratio=RATIO,
        agent_ratio=AGENT_RATIO,
        sx=sx,
        sy=sy,
        late_ratio=RATIO,
        late_sx=sx,
        late_sy=sy,
        agent_steps=1.0 if mode == "agent" else 0.0,
        min_tokens=0,
        use_rand=False,
        k_scale2=K_SCALE2,
        k_shortcut=K_SHORTCUT,
        agent_selection=selection,
    )
    attn = make_flux_attention(stream, seed=11, dtype=torch.float32)
    x, c, rotary = layer_inputs(stream, batch, h, w, extra, dtype=torch.float32)
    settings = dict(
        ratio=RATIO,
        agent_ratio=AGENT_RATIO if mode == "agent" else None,
        sx=sx,
        sy=sy,
        k_scale2=K_SCALE2,
        k_shortcut=K_SHORTCUT,
        agent_selection=selection,
        extra=extra,
        dst=top_left_destinations(h, w, sx, sy),
    )
    if stream == "double":
        ref_image, ref_text, used_agents = reference_flux_double(attn, x, c, rotary, h, w, **settings)
        image, text = run_processor(stream, attn, x, c, rotary, h, w, extra, config)
        assert image.shape == ref_image.shape and image.dtype == x.dtype
        assert text.shape == ref_text.shape and text.dtype == c.dtype
        assert relative_error(image, ref_image) < TOLERANCE
        assert relative_error(text, ref_text) < TOLERANCE
    else:
        ref, used_agents = reference_flux_single(attn, x, TEXT, rotary, h, w, **settings)
        out = run_processor(stream, attn, x, c, rotary, h, w, extra, config)
        assert out.shape == ref.shape and out.dtype == x.dtype
        assert relative_error(out, ref) < TOLERANCE
    assert used_agents == (mode == "agent")


@pytest.mark.parametrize("precision, expected", [(None, torch.bfloat16), ("fp32", torch.float32)])
@pytest.mark.parametrize("mode", ["agent", "tome"])
@pytest.mark.parametrize("stream", STREAMS)
def test_softmax_precision(stream, mode, precision, expected, sdpa_dtypes):
    """A bf16 layer: `attn_precision="fp32"` runs every softmax in fp32 (in the agent phase the
    agents' gathering, the grid queries' broadcast and the other queries' exact attention; the
    ToMe phase's one attention), None keeps bf16; the outputs are bf16 either way. The 6x6 grid's
    2x2 cells: 9 agents, under half of N' = 22."""
    config = AgentSDConfig(
        attn_precision=precision, sx=2, sy=2, late_sx=2, late_sy=2, agent_steps=1.0 if mode == "agent" else 0.0,
        min_tokens=0, use_rand=False,
    )  # fmt: skip
    attn = make_flux_attention(stream, seed=12, dtype=torch.bfloat16)
    x, c, rotary = layer_inputs(stream, 2, 6, 6, 0, dtype=torch.bfloat16)
    out = run_processor(stream, attn, x, c, rotary, 6, 6, 0, config)
    assert len(sdpa_dtypes) == (3 if mode == "agent" else 1)  # agentsd's own attention ran
    assert all(dtypes == (expected,) * 3 for dtypes in sdpa_dtypes)
    for part in out if stream == "double" else (out,):
        assert part.dtype == torch.bfloat16 and torch.isfinite(part).all()
