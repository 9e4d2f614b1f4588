"""Self-checks of the joint-attention reference (reference_joint.py), with no agentsd code: against
diffusers' own `JointAttnProcessor2_0` where agentsd must be exact, on merges small enough to
follow by hand, and on invariants of agent attention that hold whatever the weights."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from reference import _merge, reference_self_attention, top_left_destinations
from reference_joint import _match, reference_joint_attention

DIM, HEADS, TEXT = 32, 2, 7

# Module kinds: SD3's joint `attn` (text dim as SD3 builds it, or another one), its last block's
# (`context_pre_only`: text returned unprojected) and SD 3.5's image-only `attn2`.
KINDS = {
    "joint": dict(added_kv_proj_dim=DIM, context_pre_only=False),
    "joint_text24": dict(added_kv_proj_dim=24, context_pre_only=False),
    "context_pre_only": dict(added_kv_proj_dim=DIM, context_pre_only=True),
    "image_only": dict(),
}


def make_joint_attention(kind="joint", qk_norm="rms_norm", dim=DIM, heads=HEADS, seed=0):
    """A float64 module built as diffusers' JointTransformerBlock builds its attention, with
    random weights (QK-norm weights around 1, so that they matter without vanishing)."""
    torch.manual_seed(seed)
    attn = Attention(
        query_dim=dim,
        cross_attention_dim=None,
        dim_head=dim // heads,
        heads=heads,
        out_dim=dim,
        bias=True,
        processor=JointAttnProcessor2_0(),
        qk_norm=qk_norm,
        eps=1e-6,
        **KINDS[kind],
    )
    for name, param in attn.named_parameters():
        torch.nn.init.normal_(param, mean=1.0 if name.startswith("norm") else 0.0, std=0.2)
    return attn.double().eval()


def text_for(attn, batch, length=TEXT):
    return None if attn.add_k_proj is None else torch.randn(batch, length, attn.add_k_proj.in_features).double()


def diffusers_joint(attn, x, c):
    """diffusers' own joint attention (float64): (image, text or None)."""
    with torch.no_grad():
        out = attn(hidden_states=x, encoder_hidden_states=c)
    return (out, None) if c is None else out


def relative_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def tolerance(attn):
    # diffusers' RMSNorm takes the mean square in float32 even for float64 inputs.
    return 1e-6 if attn.norm_q is not None else 1e-12


CALLS = [(kind, with_text) for kind in KINDS for with_text in (True, False) if kind != "image_only" or not with_text]


# (a) Nothing merged, no agents: diffusers' joint attention itself.


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("kind, with_text", CALLS)
def test_nothing_merged_is_diffusers_joint_attention(kind, with_text, qk_norm):
    attn = make_joint_attention(kind, qk_norm, seed=1)
    x = torch.randn(2, 10 * 13, DIM).double()
    c = text_for(attn, 2) if with_text else None
    expected_image, expected_text = diffusers_joint(attn, x, c)
    for dst in (top_left_destinations(10, 13, 4, 4), top_left_destinations(10, 13, 2, 2)):
        image, text, used_agents = reference_joint_attention(attn, x, c, dst, 0.0, None, 0.3, 0.075)
        assert not used_agents
        assert image.shape == expected_image.shape
        assert relative_error(image, expected_image) <= tolerance(attn)
        if with_text:
            assert text.shape == expected_text.shape  # inner dim when context_pre_only, else C
            assert relative_error(text, expected_text) <= tolerance(attn)
        else:
            assert text is None


def test_rms_norm_weights_matter():
    """The QK-norm weights take part (a reference ignoring them would fail (a) otherwise too)."""
    attn = make_joint_attention(seed=2)
    x, c = torch.randn(1, 16, DIM).double(), text_for(attn, 1)
    before = reference_joint_attention(attn, x, c, [0, 2, 8, 10], 0.0, None, 0.3, 0.075)
    with torch.no_grad():
        attn.norm_added_k.weight.mul_(2.0)
    after = reference_joint_attention(attn, x, c, [0, 2, 8, 10], 0.0, None, 0.3, 0.075)
    assert relative_error(after[0], before[0]) > 1e-3 and relative_error(after[1], before[1]) > 1e-3
    assert relative_error(after[0], diffusers_joint(attn, x, c)[0]) <= 1e-6


# (b) Merges small enough to follow by hand: ToMe mode is diffusers' attention of the merged
# sequence, unmerged.


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("kind, with_text", CALLS)
@pytest.mark.parametrize("ratio", [0.75, 1.0])
def test_everything_merged_into_one_destination_is_attention_of_the_mean(kind, with_text, qk_norm, ratio):
    """2x2 grid, one 2x2 cell: r = min(3 sources, 4 ratio) = 3, the merged sequence is the mean
    token alone and every position gets its output; the text attends it as its one image key."""
    attn = make_joint_attention(kind, qk_norm, seed=3)
    x = torch.randn(2, 4, DIM).double()
    c = text_for(attn, 2) if with_text else None
    expected_image, expected_text = diffusers_joint(attn, x.mean(1, keepdim=True), c)
    for dst in ([0], [3]):  # wherever the destination, everything merges into it
        image, text, used_agents = reference_joint_attention(attn, x, c, dst, ratio, None, 0.3, 0.075)
        assert not used_agents
        assert relative_error(image, expected_image.expand(-1, 4, -1)) <= tolerance(attn)
        if with_text:
            assert relative_error(text, expected_text) <= tolerance(attn)


def hand_tokens(dim=8):
    """Four tokens of a 2x2 grid, destinations at 0 and 2 (two 2x1 cells, sx=2, sy=1):
    token 1 is nearer to 0 (cos 0.894) than to 2 (0.447); token 3 is nearest of all to 2 (0.995)."""
    e = torch.eye(dim, dtype=torch.float64)
    return torch.stack([e[0], e[0] + 0.5 * e[1], e[1], e[1] + 0.1 * e[0]])


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("with_text", [True, False])
def test_hand_built_merges(with_text, qk_norm):
    attn = make_joint_attention(qk_norm=qk_norm, dim=8, seed=4)
    tokens = hand_tokens()
    x = tokens.unsqueeze(0)
    c = text_for(attn, 1, length=3) if with_text else None

    def check(ratio, merged, slots, match_x=None):
        expected_image, expected_text = diffusers_joint(attn, torch.stack(merged).unsqueeze(0), c)
        image, text, _ = reference_joint_attention(attn, x, c, [0, 2], ratio, None, 0.3, 0.075, match_x=match_x)
        assert relative_error(image, expected_image[:, slots]) <= tolerance(attn)
        if with_text:
            assert relative_error(text, expected_text) <= tolerance(attn)

    t0, t1, t2, t3 = tokens
    # r = 1: token 3 (best score) merges into 2; then the unmerged source 1, destinations 0 and 2.
    check(0.25, [t1, t0, (t2 + t3) / 2], [1, 0, 2, 2])
    # r = 2: token 1 merges too, into 0: only the two destinations remain.
    check(0.5, [(t0 + t1) / 2, (t2 + t3) / 2], [0, 0, 1, 1])
    # Matched on another tensor where token 1 is the most similar to 0 and token 3 leans to 0:
    # r = 1 merges token 1 into 0; r = 2 also token 3, into 0 (a destination of three tokens).
    e = torch.eye(8, dtype=torch.float64)
    match_x = torch.stack([e[0], e[0] + 0.01 * e[1], e[1], e[0] + 0.5 * e[1]]).unsqueeze(0)
    check(0.25, [t3, (t0 + t1) / 2, t2], [1, 1, 2, 0], match_x)
    check(0.5, [(t0 + t1 + t3) / 3, t2], [0, 0, 1, 0], match_x)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("kind, with_text", CALLS)
def test_tome_mode_is_diffusers_attention_of_the_merged_sequence(kind, with_text, qk_norm):
    """Random tokens on a non-divisible grid: ToMe mode (no agents, or agents that do not pay)
    equals diffusers' joint attention of each batch element's merged image sequence (merged as
    the hand-checked merges above), unmerged; the text is not merged."""
    attn = make_joint_attention(kind, qk_norm, seed=5)
    h, w = 9, 7
    x = torch.randn(2, h * w, DIM).double()
    c = text_for(attn, 2) if with_text else None
    dst = top_left_destinations(h, w, 2, 2)
    src = [p for p in range(h * w) if p not in set(dst)]
    for agent_ratio in (None, 0.5):  # n = 63 - 31 = 32 agents, 2 n >= 38 merged tokens: ToMe mode
        image, text, used_agents = reference_joint_attention(attn, x, c, dst, 0.4, agent_ratio, 0.3, 0.075)
        assert not used_agents
        for b in range(2):
            best, order = _match(x[b], dst, src)
            merged, slot = _merge(x[b], dst, src, best, order, 25)  # floor(63 * 0.4)
            assert merged.shape[0] == 38
            cb = None if c is None else c[b : b + 1]
            expected_image, expected_text = diffusers_joint(attn, merged.unsqueeze(0), cb)
            unmerged = expected_image[0, [slot[p] for p in range(h * w)]]
            assert relative_error(image[b], unmerged) <= tolerance(attn)
            if with_text:
                assert relative_error(text[b], expected_text[0]) <= tolerance(attn)


# (c) Agent attention: invariants whatever the weights.


def single_agent_by_hand(attn, x, agent_token, c):
    """One agent, no shortcut: every image query's softmax over the one agent is 1, so every image
    token gets V_A, the agent's exact attention over all keys; computed with the module's own
    layers (diffusers' RMSNorm) and SDPA."""
    batch, heads = x.shape[0], attn.heads

    def split(t, norm=None):
        t = t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)
        return t if norm is None else norm(t)

    with torch.no_grad():
        q = split(attn.to_q(agent_token), attn.norm_q)
        k, v = split(attn.to_k(x), attn.norm_k), split(attn.to_v(x))
        if c is not None:
            k = torch.cat([k, split(attn.add_k_proj(c), attn.norm_added_k)], dim=2)
            v = torch.cat([v, split(attn.add_v_proj(c))], dim=2)
        agent_v = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, 1, -1)
        return attn.to_out[0](agent_v)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("kind, with_text", CALLS)
def test_a_single_agent_without_shortcut_gives_every_image_token_its_gather(kind, with_text, qk_norm):
    """2x2 grid, one destination, ratio 0 (N' = 4) and agent_ratio 0.75 (n = 1 < N' / 2): the
    agent is the mean token; with a pooled 2x2 cell it is the same. On a 3x2 grid the one whole
    2x2 cell pools the top four tokens only. The broadcast temperature does not matter."""
    attn = make_joint_attention(kind, qk_norm, seed=6)
    x = torch.randn(2, 4, DIM).double()
    c = text_for(attn, 2) if with_text else None
    expected = single_agent_by_hand(attn, x, x.mean(1, keepdim=True), c).expand(-1, 4, -1)
    for k_scale2, pool in [(0.3, None), (1.0, None), (0.3, (2, 2, 2, 2))]:
        image, _, used_agents = reference_joint_attention(attn, x, c, [0], 0.0, 0.75, k_scale2, 0.0, pool_cells=pool)
        assert used_agents
        assert relative_error(image, expected) <= tolerance(attn)
    x = torch.randn(2, 6, DIM).double()
    expected = single_agent_by_hand(attn, x, x[:, :4].mean(1, keepdim=True), c).expand(-1, 6, -1)
    image, _, used_agents = reference_joint_attention(attn, x, c, [1], 0.0, 0.95, 0.3, 0.0, pool_cells=(3, 2, 2, 2))
    assert used_agents
    assert relative_error(image, expected) <= tolerance(attn)


@pytest.mark.parametrize("kind", ["joint", "context_pre_only", "image_only"])
def test_the_shortcut_adds_the_projected_values(kind):
    """Nothing merged: image(k_shortcut) - image(0) = k_shortcut * to_out's weight times to_v(x)."""
    attn = make_joint_attention(kind, seed=7)
    x = torch.randn(2, 64, DIM).double()
    c = text_for(attn, 2)
    dst = top_left_destinations(8, 8, 4, 4)
    base, _, used_agents = reference_joint_attention(attn, x, c, dst, 0.0, 0.95, 0.3, 0.0)
    assert used_agents
    shifted, _, _ = reference_joint_attention(attn, x, c, dst, 0.0, 0.95, 0.3, 0.25)
    with torch.no_grad():
        expected = 0.25 * attn.to_v(x) @ attn.to_out[0].weight.T
    assert relative_error(shifted - base, expected) <= 1e-12


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("kind", ["joint", "joint_text24", "context_pre_only"])
def test_text_queries_stay_exact_in_agent_mode(kind, qk_norm):
    """Nothing merged, agents on: the text output is diffusers' exactly, the image output is not."""
    attn = make_joint_attention(kind, qk_norm, seed=8)
    x = torch.randn(3, 10 * 13, DIM).double()
    c = text_for(attn, 3)
    expected_image, expected_text = diffusers_joint(attn, x, c)
    image, text, used_agents = reference_joint_attention(
        attn, x, c, top_left_destinations(10, 13, 4, 4), 0.0, 0.95, 0.3, 0.075
    )
    assert used_agents
    assert relative_error(text, expected_text) <= tolerance(attn)
    assert relative_error(image, expected_image) > 1e-3


def test_text_tokens_do_not_count_in_the_agent_decision():
    """8x8 grid, 2x2 cells (16 destinations), agent_ratio 0.75 (n = 16): ratio 0.5 gives N' = 32
    = 2 n, so no agents, however many text tokens; ratio 0.48 gives N' = 34 > 2 n: agents."""
    attn = make_joint_attention(seed=9)
    x = torch.randn(1, 64, DIM).double()
    dst = top_left_destinations(8, 8, 2, 2)
    for c in (None, text_for(attn, 1, length=40)):
        assert not reference_joint_attention(attn, x, c, dst, 0.5, 0.75, 0.3, 0.075)[2]
        assert reference_joint_attention(attn, x, c, dst, 0.48, 0.75, 0.3, 0.075)[2]


# (d) Without text or QK norm, joint attention is the UNet's self-attention: the two references agree.


@pytest.mark.parametrize(
    "agent_ratio, options",
    [(None, {}), (0.95, {}), (0.5, {}), (0.95, {"pool_cells": (10, 13, 4, 4)}), (0.95, {"match_x": True})],
    ids=["tome", "agents", "agents-do-not-pay", "pooled", "match_x"],
)
@pytest.mark.parametrize("kind", ["joint", "image_only"])
def test_without_text_or_norm_it_is_the_unet_reference(kind, agent_ratio, options):
    attn = make_joint_attention(kind, qk_norm=None, seed=10)
    x = torch.randn(2, 10 * 13, DIM).double()
    if options.get("match_x"):
        options = {"match_x": torch.randn(2, 10 * 13, DIM).double()}
    dst = top_left_destinations(10, 13, 4, 4)
    image, text, used_agents = reference_joint_attention(attn, x, None, dst, 0.4, agent_ratio, 0.3, 0.075, **options)
    expected, expected_used = reference_self_attention(attn, x, dst, 0.4, agent_ratio, 0.3, 0.075, **options)
    assert text is None and used_agents == expected_used
    assert relative_error(image, expected) <= 1e-12
