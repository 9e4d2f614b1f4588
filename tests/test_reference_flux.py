"""Self-checks of the Flux reference (reference_flux.py), with no agentsd code: against diffusers'
own `FluxAttnProcessor` where agentsd must be exact (nothing merged; merging exact duplicates; the
merged sequence with its representatives' rotary rows), on single agents followed by hand, on
invariants of agent attention, and against the SD3 joint reference where the two algorithms meet
(no rotation, no extra tokens)."""

import types

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxPosEmbed
from reference import _merge, top_left_destinations
from reference_flux import (
    diffusers_flux_double,
    diffusers_flux_single,
    reference_flux_double,
    reference_flux_single,
    representatives,
)
from reference_joint import _match, reference_joint_attention

DIM, HEADS, HEAD_DIM, TEXT = 32, 2, 16, 5
AXES = (4, 6, 6)  # Flux's (16, 56, 56) for head_dim 128, scaled to head_dim 16: (index, row, column)
STREAMS = ("double", "single")
GRIDS = [(6, 6, 2, 2), (5, 7, 2, 2)]  # (h, w, sx, sy): divisible and not
SETTINGS = dict(k_scale2=0.3, k_shortcut=0.075)


def make_flux_attention(stream, seed=0, dtype=torch.float64):
    """A module built as diffusers' Flux blocks build theirs, with random weights (RMSNorm weights
    around 1, so that they matter without vanishing)."""
    torch.manual_seed(seed)
    if stream == "double":
        attn = FluxAttention(
            query_dim=DIM,
            heads=HEADS,
            dim_head=HEAD_DIM,
            added_kv_proj_dim=DIM,
            bias=True,
            context_pre_only=False,
            eps=1e-6,
        )
    else:
        attn = FluxAttention(query_dim=DIM, heads=HEADS, dim_head=HEAD_DIM, bias=True, eps=1e-6, pre_only=True)
    for name, param in attn.named_parameters():
        torch.nn.init.normal_(param, mean=1.0 if name.startswith("norm") else 0.0, std=0.2)
    return attn.to(dtype).eval()


def flux_ids(text_len, h, w, extra):
    """Flux's position ids: text (0, 0, 0); grid (0, row, column); extra (Kontext's reference
    image) (1, row, column) on a grid of width w."""
    text = torch.zeros(text_len, 3)
    grid = torch.tensor([[0.0, p // w, p % w] for p in range(h * w)]).reshape(-1, 3)
    ref = torch.tensor([[1.0, e // w, e % w] for e in range(extra)]).reshape(-1, 3)
    return torch.cat([text, grid, ref])


def flux_rotary(ids):
    """diffusers' Flux rotary table (cos, sin) of `ids`, the rows diffusers passes as image_rotary_emb."""
    return FluxPosEmbed(theta=10000, axes_dim=AXES)(ids)


def layer_inputs(stream, batch, h, w, extra, text_len=TEXT, dtype=torch.float64):
    """(x, c) for a double-stream layer, (s, None) for a single-stream one, and the rotary table."""
    rotary = flux_rotary(flux_ids(text_len, h, w, extra))
    if stream == "double":
        return (
            torch.randn(batch, h * w + extra, DIM, dtype=dtype),
            torch.randn(batch, text_len, DIM, dtype=dtype),
            rotary,
        )
    return torch.randn(batch, text_len + h * w + extra, DIM, dtype=dtype), None, rotary


def run_reference(stream, attn, x, c, rotary, h, w, extra, text_len=TEXT, **settings):
    """The reference on either stream: (output, used_agents), the output one tensor in the layer's
    token order (double: [text; grid; extra] of the projected outputs, as the single layout)."""
    settings = {**SETTINGS, **settings}
    if stream == "double":
        image, text, used = reference_flux_double(attn, x, c, rotary, h, w, extra=extra, **settings)
        return torch.cat([text, image], dim=1), used
    return reference_flux_single(attn, x, text_len, rotary, h, w, extra=extra, **settings)


def run_diffusers(stream, attn, x, c, rotary):
    """diffusers' FluxAttnProcessor, laid out as `run_reference`'s output."""
    if stream == "double":
        image, text = diffusers_flux_double(attn, x, c, rotary)
        return torch.cat([text, image], dim=1)
    return diffusers_flux_single(attn, x, rotary)


def relative_error(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


# diffusers rotates in float32 even for float64 inputs (apply_rotary_emb's `x.float()`).
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}


# (a) Nothing merged, no agents: diffusers' Flux attention itself.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("stream", STREAMS)
def test_nothing_merged_is_diffusers_flux_attention(stream, extra, batch, grid, dtype):
    """ratio 0 in ToMe mode (r = 0), through the module with its real FluxAttnProcessor."""
    h, w, sx, sy = grid
    attn = make_flux_attention(stream, seed=1, dtype=dtype)
    x, c, rotary = layer_inputs(stream, batch, h, w, extra, dtype=dtype)
    with torch.no_grad():
        if stream == "double":
            image, text = attn(hidden_states=x, encoder_hidden_states=c, image_rotary_emb=rotary)
            expected = torch.cat([text, image], dim=1)
        else:
            expected = attn(hidden_states=x, image_rotary_emb=rotary)
    out, used_agents = run_reference(stream, attn, x, c, rotary, h, w, extra, ratio=0.0, agent_ratio=None, sx=sx, sy=sy)
    assert not used_agents and out.dtype == torch.float64 and out.shape == expected.shape
    assert relative_error(out, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("stream", STREAMS)
def test_the_rotation_and_the_norm_weights_take_part(stream):
    """The comparisons above are sensitive to what they validate: without rotation (cos 1, sin 0),
    or with another norm_k weight, the output moves well beyond their tolerance."""
    h, w, extra = 5, 7, 3
    attn = make_flux_attention(stream, seed=2)
    x, c, rotary = layer_inputs(stream, 2, h, w, extra)
    settings = dict(ratio=0.0, agent_ratio=None, sx=2, sy=2)
    base, _ = run_reference(stream, attn, x, c, rotary, h, w, extra, **settings)
    unrotated = (torch.ones_like(rotary[0]), torch.zeros_like(rotary[1]))
    assert relative_error(run_reference(stream, attn, x, c, unrotated, h, w, extra, **settings)[0], base) > 1e-3
    with torch.no_grad():
        attn.norm_k.weight.mul_(2.0)
    changed, _ = run_reference(stream, attn, x, c, rotary, h, w, extra, **settings)
    assert relative_error(changed, base) > 1e-3
    assert relative_error(changed, run_diffusers(stream, attn, x, c, rotary)) <= 1e-6


# (b) The rotary rule: a merged slot takes its representative's angle.


def duplicate_pairs(h, w, sx, sy):
    """(source, destination) pairs to make exact duplicates: in every whole cell a neighbour of its
    destination (right or lower-right, alternately), and the grid's last token (a source of a
    partial cell on 5x7, of the last whole cell on 6x6) copying the first destination, far away."""
    dst = top_left_destinations(h, w, sx, sy)
    pairs = [(p + 1 if j % 2 == 0 else p + w + 1, p) for j, p in enumerate(dst)]
    assert h * w - 1 not in {s for s, _ in pairs} | set(dst)
    return pairs + [(h * w - 1, dst[0])]


def mean_position_rotary(ids, text_len, groups):
    """The rotary table where each group's destination row holds the angle of the group's mean
    position instead: the rule agentsd does not follow."""
    ids = ids.clone()
    for group in groups:
        ids[text_len + group[0]] = torch.stack([ids[text_len + p] for p in group]).mean(0)
    return flux_rotary(ids)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("stream", STREAMS)
def test_merging_a_duplicate_is_attention_without_it(stream, extra, batch, grid):
    """A source equal to its destination token for token merges into it (cosine 1, the best
    score) and the mean is the destination itself: with the destination's angle, agentsd is then
    exactly diffusers' attention on the sequence without the duplicates (their tokens and rotary
    rows removed), each duplicate given its destination's output. The mean position's angle
    (what a merged slot's own position would be) gives something else."""
    h, w, sx, sy = grid
    attn = make_flux_attention(stream, seed=3)
    x, c, rotary = layer_inputs(stream, batch, h, w, extra)
    start = 0 if stream == "double" else TEXT  # where the grid begins in x
    pairs = duplicate_pairs(h, w, sx, sy)
    for s, d in pairs:
        x[:, start + s] = x[:, start + d]
    removed = {s for s, _ in pairs}
    kept = [p for p in range(h * w) if p not in removed]
    ratio = (len(pairs) + 0.5) / (h * w)  # r = floor(h w ratio) = the duplicates
    out, used_agents = run_reference(
        stream, attn, x, c, rotary, h, w, extra, ratio=ratio, agent_ratio=None, sx=sx, sy=sy
    )
    assert not used_agents

    rows = list(range(TEXT)) + [TEXT + p for p in kept] + list(range(TEXT + h * w, TEXT + h * w + extra))
    tokens = [start + p for p in kept] + list(range(start + h * w, start + h * w + extra))
    if stream == "single":
        tokens = list(range(TEXT)) + tokens
    reduced = run_diffusers(stream, attn, x[:, tokens], c, (rotary[0][rows], rotary[1][rows]))
    # reduced is [text; kept grid; extra]: each position's row in it.
    where = {p: TEXT + i for i, p in enumerate(kept)} | {s: TEXT + kept.index(d) for s, d in pairs}
    layout = list(range(TEXT)) + [where[p] for p in range(h * w)] + list(range(TEXT + len(kept), reduced.shape[1]))
    assert relative_error(out, reduced[:, layout]) <= 1e-6

    groups = [[d] + [s for s, t in pairs if t == d] for d in {d for _, d in pairs}]
    moved = mean_position_rotary(flux_ids(TEXT, h, w, extra), TEXT, groups)
    elsewhere = run_diffusers(stream, attn, x[:, tokens], c, (moved[0][rows], moved[1][rows]))
    assert relative_error(out, elsewhere[:, layout]) > 1e-3


@pytest.mark.parametrize("agent_ratio", [None, 0.5], ids=["tome", "agents-do-not-pay"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("stream", STREAMS)
def test_tome_mode_is_diffusers_attention_of_the_merged_sequence(stream, extra, grid, agent_ratio):
    """Random tokens: ToMe mode equals diffusers' attention of each batch element's merged
    sequence [text; merged grid; extra] with each merged slot at its representative's rotary row
    (its destination's, or its own for a source left alone), unmerged. agent_ratio 0.5 on 2x2
    cells: n = h w - r_a agents with r_a about h w / 2 is not under half of N' = 0.6 h w."""
    h, w, sx, sy = grid
    attn = make_flux_attention(stream, seed=4)
    x, c, rotary = layer_inputs(stream, 2, h, w, extra)
    out, used_agents = run_reference(
        stream, attn, x, c, rotary, h, w, extra, ratio=0.4, agent_ratio=agent_ratio, sx=sx, sy=sy
    )
    assert not used_agents
    start = 0 if stream == "double" else TEXT
    dst = top_left_destinations(h, w, sx, sy)
    src = [p for p in range(h * w) if p not in set(dst)]
    for b in range(2):
        grid_tokens = x[b, start : start + h * w]
        best, order = _match(grid_tokens, dst, src)
        merged, slot = _merge(grid_tokens, dst, src, best, order, int(h * w * 0.4))
        reps = representatives(slot, dst)
        rows = list(range(TEXT)) + [TEXT + p for p in reps] + list(range(TEXT + h * w, TEXT + h * w + extra))
        parts = [merged, x[b, start + h * w : start + h * w + extra]]
        if stream == "single":
            parts.insert(0, x[b, :TEXT])
        cb = None if c is None else c[b : b + 1]
        expected = run_diffusers(stream, attn, torch.cat(parts).unsqueeze(0), cb, (rotary[0][rows], rotary[1][rows]))
        n_merged = merged.shape[0]
        layout = list(range(TEXT)) + [TEXT + slot[p] for p in range(h * w)]
        layout += list(range(TEXT + n_merged, TEXT + n_merged + extra))
        assert relative_error(out[b], expected[0, layout]) <= 1e-6


# (c) Agent attention, followed by hand and by its invariants.


def single_agent_by_hand(stream, attn, x, c, agent_token, agent_row, rotary):
    """One agent, no shortcut: every grid query's softmax over the one agent is 1, so every grid
    token gets V_A, the agent's exact attention over all keys [text; grid; extra]. Computed with
    the module's own layers, diffusers' apply_rotary_emb and SDPA; the agent rotated by
    `agent_row` of the rotary table. Returns the agent's output (B, 1, ...) as the layer projects
    a grid token's."""
    d = attn.head_dim
    with torch.no_grad():
        q = attn.norm_q(attn.to_q(agent_token).unflatten(-1, (-1, d)))
        q = apply_rotary_emb(
            q, (rotary[0][agent_row : agent_row + 1], rotary[1][agent_row : agent_row + 1]), sequence_dim=1
        )
        k, v = attn.norm_k(attn.to_k(x).unflatten(-1, (-1, d))), attn.to_v(x).unflatten(-1, (-1, d))
        if stream == "double":
            k = torch.cat([attn.norm_added_k(attn.add_k_proj(c).unflatten(-1, (-1, d))), k], dim=1)
            v = torch.cat([attn.add_v_proj(c).unflatten(-1, (-1, d)), v], dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
        agent_v = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        agent_v = agent_v.transpose(1, 2).flatten(2)
        return attn.to_out[0](agent_v) if stream == "double" else agent_v


@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("stream", STREAMS)
def test_a_single_agent_without_shortcut_gives_every_grid_token_its_gather(stream, extra):
    """2x2 grid, one 2x2 cell, ratio 0 (N' = 4), agent_ratio 0.95 (r_a = 3: n = 1 < N' / 2): the
    agent is the mean grid token, rotated as the cell's destination, top-left (0) or drawn; a
    pooled agent is the same. On a 3x2 grid (r_a = 5, n = 1 < 3) the one whole cell pools the top
    four tokens only, while the matched agent merges all six. The broadcast temperature does not
    matter; text and extra tokens keep diffusers' exact outputs."""
    attn = make_flux_attention(stream, seed=5)
    cases = [([0], "match", 0.3), ([2], "match", 1.0), ([0], "pool", 0.3), ([3], "pool", 0.3)]
    for h, w in [(2, 2), (3, 2)]:
        x, c, rotary = layer_inputs(stream, 2, h, w, extra)
        start = 0 if stream == "double" else TEXT
        grid_tokens = x[:, start : start + h * w]
        exact = run_diffusers(stream, attn, x, c, rotary)
        for dst, selection, k_scale2 in cases:
            agent_token = (grid_tokens[:, :4] if selection == "pool" else grid_tokens).mean(1, keepdim=True)
            agent = single_agent_by_hand(stream, attn, x, c, agent_token, TEXT + dst[0], rotary)
            out, used_agents = run_reference(
                stream,
                attn,
                x,
                c,
                rotary,
                h,
                w,
                extra,
                ratio=0.0,
                agent_ratio=0.95,
                sx=2,
                sy=2,
                k_scale2=k_scale2,
                k_shortcut=0.0,
                agent_selection=selection,
                dst=dst,
            )
            assert used_agents
            assert relative_error(out[:, TEXT : TEXT + h * w], agent.expand(-1, h * w, -1)) <= 1e-6
            assert relative_error(out[:, :TEXT], exact[:, :TEXT]) <= 1e-6
            if extra:
                assert relative_error(out[:, TEXT + h * w :], exact[:, TEXT + h * w :]) <= 1e-6


@pytest.mark.parametrize("stream", STREAMS)
def test_the_agent_takes_its_destinations_angle(stream):
    """The single agent above rotated at another grid position than its destination's (here the
    next one) is a different gather: the test above pins the agent's angle down."""
    attn = make_flux_attention(stream, seed=5)
    x, c, rotary = layer_inputs(stream, 2, 2, 2, 0)
    start = 0 if stream == "double" else TEXT
    agent_token = x[:, start : start + 4].mean(1, keepdim=True)
    at_destination = single_agent_by_hand(stream, attn, x, c, agent_token, TEXT + 0, rotary)
    assert (
        relative_error(single_agent_by_hand(stream, attn, x, c, agent_token, TEXT + 1, rotary), at_destination) > 1e-3
    )


@pytest.mark.parametrize("selection", ["match", "pool"])
@pytest.mark.parametrize("stream", STREAMS)
def test_text_and_extra_queries_stay_exact_in_agent_mode(stream, selection):
    """Nothing merged, agents on (10x13 grid, 4x4 cells: 7 matched or 6 pooled agents): the text
    and extra outputs are diffusers' exactly, the grid outputs are not."""
    h, w, extra = 10, 13, 3
    attn = make_flux_attention(stream, seed=6)
    x, c, rotary = layer_inputs(stream, 3, h, w, extra)
    exact = run_diffusers(stream, attn, x, c, rotary)
    out, used_agents = run_reference(
        stream, attn, x, c, rotary, h, w, extra, ratio=0.0, agent_ratio=0.95, sx=4, sy=4, agent_selection=selection
    )
    assert used_agents
    grid_part = slice(TEXT, TEXT + h * w)
    assert relative_error(out[:, :TEXT], exact[:, :TEXT]) <= 1e-6
    assert relative_error(out[:, TEXT + h * w :], exact[:, TEXT + h * w :]) <= 1e-6
    assert relative_error(out[:, grid_part], exact[:, grid_part]) > 1e-3


@pytest.mark.parametrize("stream", STREAMS)
def test_text_and_extra_tokens_do_not_count_in_the_agent_decision(stream):
    """8x8 grid, 2x2 cells, agent_ratio 0.75 (n = 16): ratio 0.5 gives N' = 32 = 2 n merged grid
    tokens, ToMe mode however many text and extra tokens; ratio 0.48 gives N' = 34 > 2 n: agents."""
    attn = make_flux_attention(stream, seed=7)
    for text_len, extra in [(1, 0), (40, 0), (1, 30), (40, 30)]:
        x, c, rotary = layer_inputs(stream, 1, 8, 8, extra, text_len=text_len)
        settings = dict(agent_ratio=0.75, sx=2, sy=2, text_len=text_len)
        assert not run_reference(stream, attn, x, c, rotary, 8, 8, extra, ratio=0.5, **settings)[1]
        assert run_reference(stream, attn, x, c, rotary, 8, 8, extra, ratio=0.48, **settings)[1]


@pytest.mark.parametrize("stream", STREAMS)
def test_the_shortcut_adds_the_grid_values(stream):
    """Nothing merged, agents on: out(k_shortcut) - out(0) is k_shortcut times the grid tokens'
    values (through to_out[0]'s weight on the double stream), nothing on text and extra tokens."""
    h, w, extra = 8, 8, 3
    attn = make_flux_attention(stream, seed=8)
    x, c, rotary = layer_inputs(stream, 2, h, w, extra)
    settings = dict(ratio=0.0, agent_ratio=0.95, sx=4, sy=4)
    base, used_agents = run_reference(stream, attn, x, c, rotary, h, w, extra, k_shortcut=0.0, **settings)
    assert used_agents
    shifted, _ = run_reference(stream, attn, x, c, rotary, h, w, extra, k_shortcut=0.25, **settings)
    start = 0 if stream == "double" else TEXT
    with torch.no_grad():
        values = attn.to_v(x[:, start : start + h * w])
        if stream == "double":
            values = values @ attn.to_out[0].weight.T
    expected = torch.zeros_like(base)
    expected[:, TEXT : TEXT + h * w] = 0.25 * values
    assert float((shifted - base - expected).abs().max()) <= 1e-12


# (d) Without rotation or extra tokens, Flux's layers are SD3's joint attention: the references agree.


def copied_norm(norm):
    """diffusers' RMSNorm (what reference_joint knows) with the weights of torch's."""
    copy = RMSNorm(norm.normalized_shape[0], eps=norm.eps).double()
    with torch.no_grad():
        copy.weight.copy_(norm.weight)
    return copy


def as_joint_attention(stream, attn):
    """The module as reference_joint reads a joint layer: the double stream's text is SD3's text;
    the single stream's text goes through the image layers and comes back unprojected
    (`context_pre_only`), and so does its grid (an identity `to_out`)."""
    inner = attn.heads * attn.head_dim
    joint = types.SimpleNamespace(heads=attn.heads, to_q=attn.to_q, to_k=attn.to_k, to_v=attn.to_v)
    joint.norm_q, joint.norm_k = copied_norm(attn.norm_q), copied_norm(attn.norm_k)
    if stream == "double":
        joint.add_q_proj, joint.add_k_proj, joint.add_v_proj = attn.add_q_proj, attn.add_k_proj, attn.add_v_proj
        joint.norm_added_q, joint.norm_added_k = copied_norm(attn.norm_added_q), copied_norm(attn.norm_added_k)
        joint.to_out, joint.to_add_out, joint.context_pre_only = attn.to_out, attn.to_add_out, False
    else:
        joint.add_q_proj, joint.add_k_proj, joint.add_v_proj = attn.to_q, attn.to_k, attn.to_v
        joint.norm_added_q, joint.norm_added_k = joint.norm_q, joint.norm_k
        identity = torch.nn.Linear(inner, inner).double()
        with torch.no_grad():
            identity.weight.copy_(torch.eye(inner))
            identity.bias.zero_()
        joint.to_out, joint.context_pre_only = [identity], True
    return joint


@pytest.mark.parametrize(
    "agent_ratio, options",
    [(None, {}), (0.95, {}), (0.5, {}), (0.95, {"agent_selection": "pool"}), (0.95, {"drawn": True})],
    ids=["tome", "agents", "agents-do-not-pay", "pooled", "drawn"],
)
@pytest.mark.parametrize("stream", STREAMS)
def test_without_rotation_it_is_the_joint_reference(stream, agent_ratio, options):
    h, w, sx, sy = 10, 13, 4, 4
    attn = make_flux_attention(stream, seed=9)
    x, c, rotary = layer_inputs(stream, 2, h, w, 0)
    unrotated = (torch.ones_like(rotary[0]), torch.zeros_like(rotary[1]))
    dst = top_left_destinations(h, w, sx, sy)
    if options.get("drawn"):
        dst = [p + (j % 2) * (w + 1) + (j % 3 == 0) for j, p in enumerate(dst)]  # other tokens of the same cells
    selection = options.get("agent_selection", "match")
    out, used_agents = run_reference(
        stream,
        attn,
        x,
        c,
        unrotated,
        h,
        w,
        0,
        ratio=0.4,
        agent_ratio=agent_ratio,
        sx=sx,
        sy=sy,
        agent_selection=selection,
        dst=dst,
    )
    joint = as_joint_attention(stream, attn)
    pool_cells = (h, w, sx, sy) if selection == "pool" else None
    if stream == "double":
        image, text, expected_used = reference_joint_attention(
            joint, x, c, dst, 0.4, agent_ratio, 0.3, 0.075, pool_cells=pool_cells
        )
    else:
        image, text, expected_used = reference_joint_attention(
            joint, x[:, TEXT:], x[:, :TEXT], dst, 0.4, agent_ratio, 0.3, 0.075, pool_cells=pool_cells
        )
    assert used_agents == expected_used
    assert relative_error(out, torch.cat([text, image], dim=1)) <= 1e-12
