"""An independent, deliberately plain float64 reference of agentsd on Flux's attention (loops and
einsum, sharing no code with the library): the yardstick of the Flux processor.

Flux's attention (diffusers' `FluxAttention` run by `FluxAttnProcessor`) comes in two kinds:

- Double-stream layers (`FluxTransformerBlock.attn`, with added projections). The image stream
  x (B, N, C) holds the h x w patch grid in row-major order, then E extra tokens (FLUX.1 Kontext's
  reference image; E may be 0); the text stream c (B, T, C) is separate. Per head (d = head_dim)
  the image tokens go through `to_q/to_k/to_v` with `norm_q/norm_k` on queries and keys, the text
  through `add_q_proj/add_k_proj/add_v_proj` with `norm_added_q/norm_added_k`. Every query and key,
  after its RMS norm, is rotated by its own position's row of the rotary table (cos, sin), whose
  rows follow the sequence [text; grid; extra]; values are never rotated. One softmax with scale
  d ** -0.5 over the keys [text; image]; the image part of the output goes through `to_out[0]`,
  the text part through `to_add_out`.
- Single-stream layers (`FluxSingleTransformerBlock.attn`, `pre_only`). One sequence
  s = [text; grid; extra] (B, T + N, C), every token through `to_q/to_k/to_v` and `norm_q/norm_k`,
  rotated by position, one softmax; the heads-merged output comes back unprojected. The layer is
  not told where the text ends: the caller knows T.

The rotation (diffusers' `apply_rotary_emb` with `use_real_unbind_dim=-1`): the head dim holds
interleaved pairs (t0, t1); with rot(t) the vector whose pairs are (-t1, t0),
rope(t) = t * cos + rot(t) * sin.

agentsd on these layers merges the grid tokens only, exactly as on the UNet (reference.py): one
destination per whole sx x sy cell (the top-left one unless a drawn set is given), the other grid
tokens are sources; each source's most cosine-similar destination, measured on the layer's input
tokens (the grid part of x or s), and the sources ranked by that similarity; the best
r = min(#sources, floor(h w ratio)) sources merge into their destinations, each merged token the
mean of its group. Text and extra tokens are never merged, matched or counted.

Rotary rule: a merged slot is rotated by the angle of its representative, which is the
destination of its group (every group that merged anything has one) or, for a source left
alone, the source itself. Its query, key and value are the projections of the mean token, then
the norms, then the representative's rotation. The rows of the other tokens are their own.

Agents (the agent phase): the same ranking merged at agent_ratio (r_a sources; n = h w - r_a
agents), each agent the mean token of its group through `to_q`, `norm_q` and the rotation of its
group's representative; or with pooled agents (agent_selection "pool") the mean of each whole
cell, rotated as the cell's destination (n = number of whole cells). Agents are used only when
2 n < N', with N' the merged grid token count (text and extra not counted). With K, V the keys and
values of [text; merged grid; extra] and s = d ** -0.5, per head:

    V_A    = softmax(s * A K^T) V                                   # agents gather from every key
    O_grid = softmax(s ** k_scale2 * Q_grid A^T) V_A + k_shortcut * V_grid
    O_text = softmax(s * Q_text K^T) V,  O_extra likewise            # exact

Otherwise (ToMe mode, or the ToMe-only phase: agent_ratio None) every query, text, merged grid
and extra, attends exactly over all keys. Each grid position then takes its slot's output
(unmerge), the sequence is back in the layer's order, and the output projections apply as in
diffusers. A grid with no whole cell has no destinations: nothing merges and no agents form.
"""

import math

import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from reference import _cell_means, _merge, _softmax_attention, check_one_per_whole_cell, top_left_destinations
from reference_joint import _linear, _match

AGENT_SELECTIONS = ("match", "pool")
# The projections and QK norms of each stream: (query, key, value, query norm, key norm).
IMAGE_STREAM = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")


def _rms_norm(norm, t):
    """torch's `nn.RMSNorm` over the head dim, in float64: t / sqrt(mean(t^2) + eps) * weight."""
    if tuple(norm.normalized_shape) != (t.shape[-1],) or norm.eps is None:
        raise NotImplementedError(f"the reference knows RMS normalization over the head dim with an eps, not {norm!r}")
    out = t / torch.sqrt(t.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    return out if norm.weight is None else out * norm.weight.double()


def rope(t, cos, sin):
    """Rotate t (tokens, d) by the rotary rows cos, sin (tokens, d): interleaved pairs (t0, t1),
    rot(t) = (-t1, t0) pairwise, rope(t) = t cos + rot(t) sin."""
    rotated = torch.empty_like(t)
    rotated[:, 0::2] = -t[:, 1::2]
    rotated[:, 1::2] = t[:, 0::2]
    return t * cos + rotated * sin


def representatives(slot, dst):
    """The representative position of every merged slot (`slot`: position -> merged index): the
    group's destination when it has one, else the group's one token (a source left alone)."""
    groups = {}
    for p, j in slot.items():
        groups.setdefault(j, []).append(p)
    dst_set = set(dst)
    reps = []
    for j in range(len(groups)):
        in_dst = [p for p in groups[j] if p in dst_set]
        if not in_dst:
            assert len(groups[j]) == 1, f"merged group {groups[j]} has no destination"
        reps.append(in_dst[0] if in_dst else groups[j][0])
    return reps


def cell_destinations(dst, h, w, sx, sy):
    """The destination inside each whole cell, cells in row-major order (as `_cell_means`)."""
    by_cell = {((p // w) // sy, (p % w) // sx): p for p in dst}
    return [by_cell[(i, j)] for i in range(h // sy) for j in range(w // sx)]


def _heads(attn, t, norm=None, rows=None, cos=None, sin=None):
    """(tokens, heads * d) -> per-head (tokens, d), RMS-normed by `norm` and rotated by the
    rotary rows `rows` (one per token) when given."""
    d = attn.head_dim
    parts = [t[:, hd * d : (hd + 1) * d] for hd in range(attn.heads)]
    if norm is None:
        return parts
    return [rope(_rms_norm(norm, part), cos[rows], sin[rows]) for part in parts]


def _project(attn, names, tokens, rows, cos, sin):
    """Per-head (q, k, v) of `tokens` (n, C) by the stream's layers `names`: queries and keys
    RMS-normed, then rotated by their rotary rows; values as projected."""
    q_name, k_name, v_name, q_norm, k_norm = names
    q = _heads(attn, _linear(getattr(attn, q_name), tokens), getattr(attn, q_norm), rows, cos, sin)
    k = _heads(attn, _linear(getattr(attn, k_name), tokens), getattr(attn, k_norm), rows, cos, sin)
    return q, k, _heads(attn, _linear(getattr(attn, v_name), tokens))


@torch.no_grad()
def _flux_layer(attn, text, text_names, grid, extra, rotary, h, w, settings):
    """agentsd on one Flux attention layer, per batch element; heads merged, no output projection.

    text (B, T, C) projected by `text_names`, grid (B, h w, C) and extra (B, E, C) by the image
    layers; `settings`: the keyword arguments of `reference_flux_double`. Returns
    (text_out (B, T, inner), grid_out (B, h w, inner), extra_out (B, E, inner), used_agents)."""
    ratio, agent_ratio, sx, sy = settings["ratio"], settings["agent_ratio"], settings["sx"], settings["sy"]
    agent_selection, dst = settings["agent_selection"], settings["dst"]
    if agent_selection not in AGENT_SELECTIONS:
        raise ValueError(f"agent_selection={agent_selection!r}: use one of {AGENT_SELECTIONS}")
    num_text, num_grid, num_extra = text.shape[1], h * w, extra.shape[1]
    cos, sin = (t.double() for t in rotary)
    assert cos.shape[0] == num_text + num_grid + num_extra, "one rotary row per token of [text; grid; extra]"
    if dst is None:
        dst = top_left_destinations(h, w, sx, sy)
    dst = [int(p) for p in dst]
    check_one_per_whole_cell(dst, h, w, sx, sy)
    src = [p for p in range(num_grid) if p not in set(dst)]
    r = min(len(src), math.floor(num_grid * ratio)) if dst else 0
    use_agents = False
    if agent_ratio is not None and dst:
        r_agent = min(len(src), math.floor(num_grid * agent_ratio))
        num_agents = len(dst) if agent_selection == "pool" else num_grid - r_agent
        use_agents = 2 * num_agents < num_grid - r
    s = attn.head_dim**-0.5
    text_rows = list(range(num_text))
    extra_rows = [num_text + num_grid + e for e in range(num_extra)]
    text_outputs, grid_outputs, extra_outputs = [], [], []
    for b in range(grid.shape[0]):
        xb = grid[b].double()
        if dst:
            best, order = _match(xb, dst, src)
            merged, slot = _merge(xb, dst, src, best, order, r)
        else:
            merged, slot = xb, {p: p for p in range(num_grid)}
        grid_rows = [num_text + p for p in representatives(slot, dst)]
        q_txt, k_txt, v_txt = _project(attn, text_names, text[b].double(), text_rows, cos, sin)
        q_grid, k_grid, v_grid = _project(attn, IMAGE_STREAM, merged, grid_rows, cos, sin)
        q_ext, k_ext, v_ext = _project(attn, IMAGE_STREAM, extra[b].double(), extra_rows, cos, sin)
        if use_agents:
            if agent_selection == "pool":
                agent_tokens = _cell_means(xb, (h, w, sx, sy))
                agent_reps = cell_destinations(dst, h, w, sx, sy)
            else:
                agent_tokens, agent_slot = _merge(xb, dst, src, best, order, r_agent)
                agent_reps = representatives(agent_slot, dst)
            agent_rows = [num_text + p for p in agent_reps]
            agents = _heads(attn, _linear(attn.to_q, agent_tokens), attn.norm_q, agent_rows, cos, sin)
        text_heads, grid_heads, extra_heads = [], [], []
        for hd in range(attn.heads):
            keys = torch.cat([k_txt[hd], k_grid[hd], k_ext[hd]])
            values = torch.cat([v_txt[hd], v_grid[hd], v_ext[hd]])
            text_heads.append(_softmax_attention(q_txt[hd], keys, values, s))
            extra_heads.append(_softmax_attention(q_ext[hd], keys, values, s))
            if use_agents:
                agent_v = _softmax_attention(agents[hd], keys, values, s)
                o = _softmax_attention(q_grid[hd], agents[hd], agent_v, s ** settings["k_scale2"])
                o = o + settings["k_shortcut"] * v_grid[hd]
            else:
                o = _softmax_attention(q_grid[hd], keys, values, s)
            grid_heads.append(o)
        o_grid = torch.cat(grid_heads, dim=-1)
        text_outputs.append(torch.cat(text_heads, dim=-1))
        grid_outputs.append(torch.stack([o_grid[slot[p]] for p in range(num_grid)]))
        extra_outputs.append(torch.cat(extra_heads, dim=-1))
    return torch.stack(text_outputs), torch.stack(grid_outputs), torch.stack(extra_outputs), use_agents


@torch.no_grad()
def reference_flux_double(
    attn,
    x,
    c,
    rotary,
    h,
    w,
    *,
    ratio,
    agent_ratio,
    sx,
    sy,
    k_scale2,
    k_shortcut,
    agent_selection="match",
    extra=0,
    dst=None,
):
    """agentsd on a double-stream Flux attention layer, in float64.

    Args:
        attn: a diffusers `FluxAttention` with added projections (its weights are read in float64).
        x: image-stream tokens (B, h w + extra, C): the grid in row-major order, then the extra ones.
        c: text tokens (B, T, C).
        rotary: (cos, sin), each (T + h w + extra, head_dim), rows in [text; grid; extra] order.
        h, w: the patch grid.
        ratio: ToMe merge ratio of the grid; agent_ratio: the agents' merge ratio, None for no
            agents (ToMe mode, the ToMe-only phase); sx, sy: the cells.
        k_scale2, k_shortcut: the broadcast temperature's exponent and the value shortcut.
        agent_selection: "match" (agents merged at agent_ratio) or "pool" (cell means).
        extra: E, the number of extra tokens at the end of x (never merged).
        dst: drawn destinations (one per whole cell); None: the top-left ones.

    Returns (image_out (B, h w + extra, C) through `to_out[0]`, text_out (B, T, C) through
    `to_add_out`, used_agents)."""
    assert attn.added_kv_proj_dim is not None and not attn.pre_only, "a double-stream layer"
    assert x.shape[1] == h * w + extra, f"x holds {x.shape[1]} tokens, not h w + extra = {h * w + extra}"
    settings = dict(ratio=ratio, agent_ratio=agent_ratio, sx=sx, sy=sy, k_scale2=k_scale2, k_shortcut=k_shortcut)
    settings.update(agent_selection=agent_selection, dst=dst)
    grid, rest = x[:, : h * w], x[:, h * w :]
    text_out, grid_out, extra_out, used_agents = _flux_layer(attn, c, TEXT_STREAM, grid, rest, rotary, h, w, settings)
    image = torch.stack([_linear(attn.to_out[0], t) for t in torch.cat([grid_out, extra_out], dim=1)])
    text = torch.stack([_linear(attn.to_add_out, t) for t in text_out])
    return image, text, used_agents


@torch.no_grad()
def reference_flux_single(
    attn,
    s,
    text_len,
    rotary,
    h,
    w,
    *,
    ratio,
    agent_ratio,
    sx,
    sy,
    k_scale2,
    k_shortcut,
    agent_selection="match",
    extra=0,
    dst=None,
):
    """agentsd on a single-stream Flux attention layer (`pre_only`), in float64.

    Args:
        attn: a diffusers `FluxAttention` with `pre_only` (no added projections, no output one).
        s: the sequence (B, T + h w + extra, C): text_len text tokens, the grid, the extra tokens.
        text_len: T, where the text ends (the layer itself is not told).
        The others as in `reference_flux_double`.

    Returns (out (B, T + h w + extra, heads * head_dim) in s's order, unprojected, used_agents)."""
    assert attn.pre_only and attn.added_kv_proj_dim is None, "a single-stream layer"
    end = text_len + h * w
    assert s.shape[1] == end + extra, f"s holds {s.shape[1]} tokens, not T + h w + extra = {end + extra}"
    settings = dict(ratio=ratio, agent_ratio=agent_ratio, sx=sx, sy=sy, k_scale2=k_scale2, k_shortcut=k_shortcut)
    settings.update(agent_selection=agent_selection, dst=dst)
    text, grid, rest = s[:, :text_len], s[:, text_len:end], s[:, end:]
    text_out, grid_out, extra_out, used_agents = _flux_layer(
        attn, text, IMAGE_STREAM, grid, rest, rotary, h, w, settings
    )
    return torch.cat([text_out, grid_out, extra_out], dim=1), used_agents


def diffusers_flux_double(attn, x, c, rotary):
    """diffusers' own `FluxAttnProcessor` on a double-stream layer, whatever processor the module
    holds now: (image_out, text_out) in the inputs' dtype."""
    with torch.no_grad():
        return FluxAttnProcessor()(attn, x, c, image_rotary_emb=rotary)


def diffusers_flux_single(attn, s, rotary):
    """diffusers' own `FluxAttnProcessor` on a single-stream layer: the unprojected output."""
    with torch.no_grad():
        return FluxAttnProcessor()(attn, s, image_rotary_emb=rotary)


def reference_flux_sharded(attn, text, text_names, grid, rotary, local_hw, ranks, settings):
    """agentsd on a Flux attention layer under context parallelism over `ranks` ranks, in float64,
    in one process: the text (B, T, C) and the grid (B, h w, C) each split into `ranks` equal runs
    (run r: text tokens r T/ranks.., the grid's rows r h/ranks..), every grid run merged by its own
    top-left plan on `local_hw` (its agents likewise), with the rotary rows of its own positions
    (the table's rows follow [text; grid]).

    The agents of every run gather, in one softmax, from the keys and values of every run's [text;
    merged grid]; each run's grid queries attend over every agent (plus their value shortcut); every
    text query attends exactly over every run's keys. Agents are used when 2 n_run < N'_run. In the
    ToMe phase (`settings["agent_ratio"]` None) every query attends exactly over every run's keys.

    Returns (text_out (B, T, inner), grid_out (B, h w, inner) unprojected, used_agents, agents per run)."""
    h, w = local_hw
    sx, sy, ratio, agent_ratio = settings["sx"], settings["sy"], settings["ratio"], settings["agent_ratio"]
    cos, sin = (t.double() for t in rotary)
    num_text, local = text.shape[1] // ranks, h * w
    assert text.shape[1] == ranks * num_text and grid.shape[1] == ranks * local == cos.shape[0] - text.shape[1]
    dst = top_left_destinations(h, w, sx, sy)
    src = [p for p in range(local) if p not in set(dst)]
    r = min(len(src), math.floor(local * ratio))
    use_agents, n = False, 0
    if agent_ratio is not None:
        r_agent = min(len(src), math.floor(local * agent_ratio))
        n = local - r_agent
        use_agents = 2 * n < local - r
    s = attn.head_dim**-0.5
    text_outputs, grid_outputs = [], []
    for b in range(grid.shape[0]):
        runs = []  # per run: (slot, q_text, k, v, q_grid, v_grid, agents), k and v over [text; merged grid]
        for run in range(ranks):
            xr = grid[b, run * local : (run + 1) * local].double()
            best, order = _match(xr, dst, src)
            merged, slot = _merge(xr, dst, src, best, order, r)
            grid_rows = [text.shape[1] + run * local + p for p in representatives(slot, dst)]
            text_rows = [run * num_text + i for i in range(num_text)]
            tr = text[b, run * num_text : (run + 1) * num_text].double()
            q_txt, k_txt, v_txt = _project(attn, text_names, tr, text_rows, cos, sin)
            q_grid, k_grid, v_grid = _project(attn, IMAGE_STREAM, merged, grid_rows, cos, sin)
            agents = None
            if use_agents:
                tokens, agent_slot = _merge(xr, dst, src, best, order, r_agent)
                agent_rows = [text.shape[1] + run * local + p for p in representatives(agent_slot, dst)]
                agents = _heads(attn, _linear(attn.to_q, tokens), attn.norm_q, agent_rows, cos, sin)
            keys = [torch.cat([k_txt[hd], k_grid[hd]]) for hd in range(attn.heads)]
            values = [torch.cat([v_txt[hd], v_grid[hd]]) for hd in range(attn.heads)]
            runs.append((slot, q_txt, keys, values, q_grid, v_grid, agents))
        text_b, grid_b = [], []
        for slot, q_txt, _, _, q_grid, v_grid, _ in runs:
            text_heads, grid_heads = [], []
            for hd in range(attn.heads):
                keys = torch.cat([run[2][hd] for run in runs])
                values = torch.cat([run[3][hd] for run in runs])
                text_heads.append(_softmax_attention(q_txt[hd], keys, values, s))
                if use_agents:
                    everyone = torch.cat([run[6][hd] for run in runs])
                    agent_v = _softmax_attention(everyone, keys, values, s)
                    o = _softmax_attention(q_grid[hd], everyone, agent_v, s ** settings["k_scale2"])
                    grid_heads.append(o + settings["k_shortcut"] * v_grid[hd])
                else:
                    grid_heads.append(_softmax_attention(q_grid[hd], keys, values, s))
            o_grid = torch.cat(grid_heads, dim=-1)
            text_b.append(torch.cat(text_heads, dim=-1))
            grid_b.append(torch.stack([o_grid[slot[p]] for p in range(local)]))
        text_outputs.append(torch.cat(text_b))
        grid_outputs.append(torch.cat(grid_b))
    return torch.stack(text_outputs), torch.stack(grid_outputs), use_agents, n
