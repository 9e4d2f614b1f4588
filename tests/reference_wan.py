"""An independent, deliberately plain float64 reference of agentsd on Wan's video self-attention
(loops and einsum, sharing no code with the library): the yardstick of the Wan processor.

Wan's self-attention (diffusers' `WanAttention` run by `WanAttnProcessor`, the `attn1` of every
block) gets the video tokens x (B, N, C), a frames x rows x columns grid flattened frame-major
(position p = (t * h + i) * w + j), and a rotary table (cos, sin) with one row per token. Queries
and keys are projected (`to_q`, `to_k`), RMS-normalized over all heads at once (`norm_q`,
`norm_k`, before the split into heads), split into heads of d channels, and rotated: the head dim
holds interleaved pairs (t0, t1), rotated as (t0 c - t1 s, t0 s + t1 c) with c the pair's cosine
(its even entry) and s its sine (its odd entry). Values are projected and split, never rotated.
One softmax attention per head with scale d ** -0.5; heads merged; `to_out`.

agentsd on it: one destination per whole st x sy x sx box of the grid (st frames, sy rows, sx
columns; the first token of the box unless a drawn set is given, which must hold exactly one token
per whole box); tokens of partial boxes (the last frames, the bottom, the right) are sources. Each
source's most cosine-similar destination on x, the sources ranked by it; the best
r = min(#sources, floor(N ratio)) merge (each merged token the mean of its group). The merged
tokens' queries, keys and values are those of the mean token, RMS-normed, then rotated by the angle
of the group's representative: its destination (a source left alone: itself).

Agents (agent phase): the ranking merged at agent_ratio (n = N - r_a agents), each the mean token
of its group through `to_q`, `norm_q` and its representative's rotation; or pooled (agent
selection "pool"): the mean of each whole box, rotated as its destination. Agents only when
2 n < N'. Per head with s = d ** -0.5:

    V_A = softmax(s A K^T) V;   O = softmax(s ** k_scale2 Q A^T) V_A + k_shortcut V

otherwise softmax(s Q K^T) V over the merged tokens. Then `to_out`, and each position takes its
slot's output.
"""

import math

import torch
from reference import _merge, _softmax_attention
from reference_flux import representatives
from reference_joint import _linear, _match


def box_of(p, grid, cells):
    """The (frame, row, column) box index of position p in a frames x h x w grid of st x sy x sx
    boxes, or None when p lies in a partial box."""
    f, h, w = grid
    st, sy, sx = cells
    t, i, j = p // (h * w), (p // w) % h, p % w
    box = (t // st, i // sy, j // sx)
    return box if all(b < n for b, n in zip(box, (f // st, h // sy, w // sx), strict=True)) else None


def whole_boxes(grid, cells):
    f, h, w = grid
    st, sy, sx = cells
    return [(a, b, c) for a in range(f // st) for b in range(h // sy) for c in range(w // sx)]


def first_token_destinations(grid, cells):
    """Destinations without randomness: the first token (first frame, top-left) of every whole box,
    boxes in frame-major, row-major order."""
    f, h, w = grid
    st, sy, sx = cells
    return [(a * st * h + b * sy) * w + c * sx for a, b, c in whole_boxes(grid, cells)]


def check_one_per_whole_box(dst, grid, cells):
    """Drawn destinations: exactly one token in each whole box, none elsewhere."""
    boxes = sorted(box_of(int(p), grid, cells) or (-1,) for p in dst)
    assert boxes == whole_boxes(grid, cells), f"destinations {list(map(int, dst))} are not one per whole box"


def box_destinations(dst, grid, cells):
    """The destination of each whole box, in box order."""
    by_box = {box_of(int(p), grid, cells): int(p) for p in dst}
    return [by_box[box] for box in whole_boxes(grid, cells)]


def box_means(xb, grid, cells):
    """The mean token of every whole box, in box order."""
    f, h, w = grid
    st, sy, sx = cells
    means = []
    for a, b, c in whole_boxes(grid, cells):
        group = [
            ((a * st + dt) * h + b * sy + di) * w + c * sx + dj
            for dt in range(st)
            for di in range(sy)
            for dj in range(sx)
        ]
        means.append(xb[group].mean(0))
    return torch.stack(means)


def _rms(norm, t):
    """`nn.RMSNorm` over the last dim in float64 (Wan's norm_q / norm_k span every head)."""
    out = t / torch.sqrt(t.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    return out if norm.weight is None else out * norm.weight.double()


def rotate_pairs(t, cos, sin):
    """Rotate t (tokens, d) by rows cos, sin (tokens, d): each pair (t0, t1) by its even cosine and
    odd sine entries."""
    c, s = cos[:, 0::2], sin[:, 1::2]
    out = torch.empty_like(t)
    out[:, 0::2] = t[:, 0::2] * c - t[:, 1::2] * s
    out[:, 1::2] = t[:, 0::2] * s + t[:, 1::2] * c
    return out


def _heads(attn, t, rows=None, cos=None, sin=None):
    """(tokens, heads * d) -> per-head (tokens, d), each rotated by the rows `rows` when given."""
    d = t.shape[-1] // attn.heads
    parts = [t[:, hd * d : (hd + 1) * d] for hd in range(attn.heads)]
    return parts if rows is None else [rotate_pairs(part, cos[rows], sin[rows]) for part in parts]


@torch.no_grad()
def reference_wan_self_attention(
    attn, x, rotary, grid, cells, ratio, agent_ratio, k_scale2=0.3, k_shortcut=0.075, dst=None, selection="match"
):
    """agentsd on a Wan self-attention layer: (output (B, N, C) float64, used_agents).

    Args:
        attn: a diffusers `WanAttention` (self-attention).
        x: (B, N, C) the layer's input, N = frames * h * w.
        rotary: (cos, sin), each (N, d) or diffusers' (1, N, 1, d).
        grid: (frames, h, w); cells: (st, sy, sx), st already at most frames.
        agent_ratio: None for the ToMe-only phase.
        dst: drawn destinations (checked one per whole box); the first tokens when None.
    """
    cos, sin = (t.reshape(t.shape[-3], t.shape[-1]).double() if t.ndim == 4 else t.double() for t in rotary)
    num = x.shape[1]
    assert num == math.prod(grid) == cos.shape[0], "one token and one rotary row per grid position"
    dst = first_token_destinations(grid, cells) if dst is None else [int(p) for p in dst]
    check_one_per_whole_box(dst, grid, cells)
    src = [p for p in range(num) if p not in set(dst)]
    r = min(len(src), math.floor(num * ratio)) if dst else 0
    use_agents = False
    if agent_ratio is not None and dst:
        r_agent = min(len(src), math.floor(num * agent_ratio))
        n = len(dst) if selection == "pool" else num - r_agent
        use_agents = 2 * n < num - r
    s = (attn.inner_dim // attn.heads) ** -0.5
    outputs = []
    for b in range(x.shape[0]):
        xb = x[b].double()
        if dst:
            best, order = _match(xb, dst, src)
            merged, slot = _merge(xb, dst, src, best, order, r)
        else:
            merged, slot = xb, {p: p for p in range(num)}
        rows = representatives(slot, dst)
        q = _heads(attn, _rms(attn.norm_q, _linear(attn.to_q, merged)), rows, cos, sin)
        k = _heads(attn, _rms(attn.norm_k, _linear(attn.to_k, merged)), rows, cos, sin)
        v = _heads(attn, _linear(attn.to_v, merged))
        if use_agents:
            if selection == "pool":
                tokens, agent_rows = box_means(xb, grid, cells), box_destinations(dst, grid, cells)
            else:
                tokens, agent_slot = _merge(xb, dst, src, best, order, r_agent)
                agent_rows = representatives(agent_slot, dst)
            agents = _heads(attn, _rms(attn.norm_q, _linear(attn.to_q, tokens)), agent_rows, cos, sin)
        per_head = []
        for hd in range(attn.heads):
            if use_agents:
                agent_v = _softmax_attention(agents[hd], k[hd], v[hd], s)
                o = _softmax_attention(q[hd], agents[hd], agent_v, s**k_scale2) + k_shortcut * v[hd]
            else:
                o = _softmax_attention(q[hd], k[hd], v[hd], s)
            per_head.append(o)
        o = _linear(attn.to_out[0], torch.cat(per_head, dim=-1))
        outputs.append(torch.stack([o[slot[p]] for p in range(num)]))
    return torch.stack(outputs), use_agents


@torch.no_grad()
def reference_wan_sharded(
    attn, x, rotary, local_grid, cells, ranks, ratio, agent_ratio, k_scale2=0.3, k_shortcut=0.075, selection="match",
    leads=None,
):  # fmt: skip
    """agentsd on a Wan self-attention layer whose tokens are split into `ranks` equal runs (diffusers'
    context parallelism), every run merged by its own first-token plan on `local_grid` placed after
    the run's first `leads[run]` tokens (0 when None): (output (B, N, C) float64, used_agents,
    agents per run).

    A run's tokens outside its grid (before and after it) are sources. Each run's merged tokens and
    agents are made as in `reference_wan_self_attention`, from its own tokens, with the rotary rows
    of its own positions; merge counts and agents count every token of the run. Agents are used
    when 2 n_run < N'_run. The agents of every run gather, in one softmax, from the merged keys
    and values of every run; each run's queries then attend over every agent (plus their value
    shortcut). In the ToMe phase each run's queries attend exactly over every run's merged keys."""
    cos, sin = (t.reshape(t.shape[-3], t.shape[-1]).double() if t.ndim == 4 else t.double() for t in rotary)
    num, grid_tokens = x.shape[1], math.prod(local_grid)
    local = num // ranks
    assert num == ranks * local == cos.shape[0], "equal runs, one rotary row per token"
    leads = leads or [0] * ranks
    assert all(0 <= lead and lead + grid_tokens <= local for lead in leads), "each run's grid lies inside the run"
    s = (attn.inner_dim // attn.heads) ** -0.5
    outputs, n = [], 0
    for b in range(x.shape[0]):
        runs = []  # per run: (slot, q, k, v, agents)
        for run in range(ranks):
            lead = leads[run]
            dst = [lead + p for p in first_token_destinations(local_grid, cells)]
            src = [p for p in range(local) if p not in set(dst)]
            r = min(len(src), math.floor(local * ratio))
            use_agents = False
            if agent_ratio is not None:
                r_agent = min(len(src), math.floor(local * agent_ratio))
                n = len(dst) if selection == "pool" else local - r_agent
                use_agents = 2 * n < local - r
            xr = x[b, run * local : (run + 1) * local].double()
            best, order = _match(xr, dst, src)
            merged, slot = _merge(xr, dst, src, best, order, r)
            rows = [run * local + p for p in representatives(slot, dst)]
            q = _heads(attn, _rms(attn.norm_q, _linear(attn.to_q, merged)), rows, cos, sin)
            k = _heads(attn, _rms(attn.norm_k, _linear(attn.to_k, merged)), rows, cos, sin)
            v = _heads(attn, _linear(attn.to_v, merged))
            agents = None
            if use_agents:
                if selection == "pool":
                    tokens = box_means(xr[lead : lead + grid_tokens], local_grid, cells)
                    agent_rows = [lead + p for p in box_destinations([p - lead for p in dst], local_grid, cells)]
                else:
                    tokens, agent_slot = _merge(xr, dst, src, best, order, r_agent)
                    agent_rows = representatives(agent_slot, dst)
                agent_rows = [run * local + p for p in agent_rows]
                agents = _heads(attn, _rms(attn.norm_q, _linear(attn.to_q, tokens)), agent_rows, cos, sin)
            runs.append((slot, q, k, v, agents))
        out_b = []
        for slot, q, _, v, _ in runs:
            per_head = []
            for hd in range(attn.heads):
                keys = torch.cat([run[2][hd] for run in runs])
                values = torch.cat([run[3][hd] for run in runs])
                if use_agents:
                    everyone = torch.cat([run[4][hd] for run in runs])
                    agent_v = _softmax_attention(everyone, keys, values, s)
                    o = _softmax_attention(q[hd], everyone, agent_v, s**k_scale2) + k_shortcut * v[hd]
                else:
                    o = _softmax_attention(q[hd], keys, values, s)
                per_head.append(o)
            o = _linear(attn.to_out[0], torch.cat(per_head, dim=-1))
            out_b.append(torch.stack([o[slot[p]] for p in range(local)]))
        outputs.append(torch.cat(out_b))
    return torch.stack(outputs), use_agents, n
