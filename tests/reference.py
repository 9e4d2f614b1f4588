"""An independent, deliberately plain implementation of ALGORITHM.md (loops and einsum,
float64), sharing no code with the library: the yardstick of the numeric tests."""

import math

import torch


def top_left_destinations(h, w, sx, sy):
    """Destinations without randomness: the top-left token of every whole sy x sx cell of an
    h x w grid (partial cells at the bottom and right hold none), in row-major cell order."""
    return [top * w + left for top in range(0, h - sy + 1, sy) for left in range(0, w - sx + 1, sx)]


def check_one_per_whole_cell(dst, h, w, sx, sy):
    """Drawn destinations: exactly one token in each whole sy x sx cell, none elsewhere."""
    cells = sorted(((int(p) // w) // sy, (int(p) % w) // sx) for p in dst)
    whole = [(i, j) for i in range(h // sy) for j in range(w // sx)]
    assert cells == whole, f"destinations {list(map(int, dst))} are not one per whole {sx}x{sy} cell"


def _merge(x, dst, src, best, order, r):
    """Tokens after merging the r best-ranked sources: unmerged sources, then destinations
    (each the mean of itself and its merged sources); and each position's merged index."""
    merged_into = {j: [] for j in range(len(dst))}
    for i in order[:r]:
        merged_into[best[i]].append(src[i])
    tokens, slot = [], {}
    for i in order[r:]:
        slot[src[i]] = len(tokens)
        tokens.append(x[src[i]])
    for j, p in enumerate(dst):
        group = [p] + merged_into[j]
        for q in group:
            slot[q] = len(tokens)
        tokens.append(torch.stack([x[q] for q in group]).mean(0))
    return torch.stack(tokens), slot


def _softmax_attention(q, k, v, scale):
    weights = torch.einsum("id,jd->ij", q, k) * scale
    weights = torch.exp(weights - weights.max(dim=-1, keepdim=True).values)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("ij,jd->id", weights, v)


def _cell_means(xb, cells):
    """Mean of every whole sy x sx cell of an h x w grid, cells in row-major order."""
    h, w, sx, sy = cells
    means = []
    for top in range(0, (h // sy) * sy, sy):
        for left in range(0, (w // sx) * sx, sx):
            group = [(top + i) * w + left + j for i in range(sy) for j in range(sx)]
            means.append(xb[group].mean(0))
    return torch.stack(means)


@torch.no_grad()
def reference_self_attention(attn, x, dst, ratio, agent_ratio, k_scale2, k_shortcut, match_x=None, pool_cells=None):
    """Agent attention (or ToMe when agents don't pay, or agent_ratio is None) of a diffusers
    `Attention` module's weights on x (B, N, C), with the given destination positions.

    Options: `match_x` ranks and matches tokens by the similarity of another tensor of x's
    shape (a matching shared from another layer); `pool_cells=(h, w, sx, sy)` makes the
    agents the means of the whole grid cells instead of a merge at `agent_ratio`. The module's
    `residual_connection` and `rescale_output_factor` apply to the unmerged output, as in
    diffusers."""
    lin = {name: (getattr(attn, name).weight.double(), getattr(attn, name).bias) for name in ("to_q", "to_k", "to_v")}

    def project(name, t):
        weight, bias = lin[name]
        out = torch.einsum("nc,oc->no", t, weight)
        return out if bias is None else out + bias.double()

    heads = attn.heads
    batch, num_tokens, _ = x.shape
    dst = [int(p) for p in dst]
    dst_set = set(dst)
    src = [p for p in range(num_tokens) if p not in dst_set]
    r = min(len(src), math.floor(num_tokens * ratio))
    r_agent = None if agent_ratio is None else min(len(src), math.floor(num_tokens * agent_ratio))
    use_agents = False
    if agent_ratio is not None:
        num_agents = len(dst) if pool_cells is not None else num_tokens - r_agent
        use_agents = 2 * num_agents < num_tokens - r
    outputs = []
    for b in range(batch):
        xb = x[b].double()
        mb = xb if match_x is None else match_x[b].double()
        unit = mb / mb.norm(dim=-1, keepdim=True)
        sim = torch.einsum("sc,dc->sd", unit[src], unit[dst])
        score, best = sim.max(dim=-1)
        order = sorted(range(len(src)), key=lambda i: -float(score[i]))
        best = [int(j) for j in best]
        xm, slot = _merge(xb, dst, src, best, order, r)
        q, k, v = project("to_q", xm), project("to_k", xm), project("to_v", xm)
        d = q.shape[-1] // heads
        s = d**-0.5
        if use_agents:
            tokens = (
                _cell_means(xb, pool_cells) if pool_cells is not None else _merge(xb, dst, src, best, order, r_agent)[0]
            )
            agents = project("to_q", tokens)
        per_head = []
        for hd in range(heads):
            part = slice(hd * d, (hd + 1) * d)
            if use_agents:
                a = agents[:, part]
                agent_v = _softmax_attention(a, k[:, part], v[:, part], s)
                o = _softmax_attention(q[:, part], a, agent_v, s**k_scale2) + k_shortcut * v[:, part]
            else:
                o = _softmax_attention(q[:, part], k[:, part], v[:, part], s)
            per_head.append(o)
        o = torch.cat(per_head, dim=-1)
        o = torch.einsum("nc,oc->no", o, attn.to_out[0].weight.double()) + attn.to_out[0].bias.double()
        o = torch.stack([o[slot[p]] for p in range(num_tokens)])
        if attn.residual_connection:
            o = o + xb
        outputs.append(o / attn.rescale_output_factor)
    return torch.stack(outputs), use_agents
