"""An independent, deliberately plain float64 reference of agentsd on SD3's joint attention
(loops and einsum, sharing no code with the library): the yardstick of the joint processor.

SD3's joint attention (diffusers' `JointAttnProcessor2_0`): image tokens x (B, N, C) project
with `to_q/to_k/to_v`, text tokens c (B, L, C_text) with `add_q_proj/add_k_proj/add_v_proj`;
per head, optional RMS QK normalization (`norm_q/norm_k` on the image, `norm_added_q/norm_added_k`
on the text); one softmax over the keys [image; text] with scale d ** -0.5; the image part of the
output goes through `to_out`, the text part through `to_add_out` (unless `context_pre_only`).

agentsd on it: only the image tokens are merged, on their patch grid, as in the UNet path
(reference.py: cells, cosine matching on x, ToMe merge of the top r sources, agents from the
same ranking at `agent_ratio` or the cell means); text is never merged. With n agents and N'
merged image tokens, agents are used only when 2 n < N' (text tokens are not counted):

    V_A   = softmax(s * A [K_img; K_txt]^T) [V_img; V_txt]       # agents gather from all keys
    O_img = softmax(s ** k_scale2 * Q_img A^T) V_A + k_shortcut * V_img
    O_txt = softmax(s * Q_txt [K_img; K_txt]^T) [V_img; V_txt]   # exact

with A the agent tokens through `to_q` and `norm_q`. Otherwise (ToMe mode) every query, merged
image and text, attends exactly over all merged image and text keys. Image outputs are unmerged
(every position gets its slot's output)."""

import math

import torch
from reference import _cell_means, _merge, _softmax_attention


def _linear(layer, t):
    """A diffusers/torch `nn.Linear` applied in float64 to t (tokens, in_features)."""
    out = torch.einsum("nc,oc->no", t, layer.weight.double())
    return out if layer.bias is None else out + layer.bias.double()


def _rms_norm(norm, t):
    """`norm` (None, or diffusers' `RMSNorm` over the head dim) applied in float64 to t (tokens, d):
    t / sqrt(mean(t^2) + eps), times the learned weight (and plus the bias) when there is one."""
    if norm is None:
        return t
    if type(norm).__name__ != "RMSNorm" or tuple(norm.dim) != (t.shape[-1],):
        raise NotImplementedError(f"the reference knows RMS normalization over the head dim only, not {norm!r}")
    out = t / torch.sqrt(t.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    if norm.weight is not None:
        out = out * norm.weight.double()
    if getattr(norm, "bias", None) is not None:
        out = out + norm.bias.double()
    return out


def _heads(t, heads, norm=None):
    """(tokens, heads * d) -> a list of per-head (tokens, d), each normalized by `norm`."""
    d = t.shape[-1] // heads
    return [_rms_norm(norm, t[:, hd * d : (hd + 1) * d]) for hd in range(heads)]


def _match(xb, dst, src):
    """Each source's most cosine-similar destination (index into dst) and the sources ranked by
    that similarity, highest first (ties keep position order)."""
    unit = xb / xb.norm(dim=-1, keepdim=True)
    best, score = [], []
    for p in src:
        sims = [float(torch.dot(unit[p], unit[q])) for q in dst]
        j = max(range(len(dst)), key=lambda i: sims[i])  # first of equal maxima
        best.append(j)
        score.append(sims[j])
    order = sorted(range(len(src)), key=lambda i: -score[i])
    return best, order


@torch.no_grad()
def reference_joint_attention(attn, x, c, dst, ratio, agent_ratio, k_scale2, k_shortcut, match_x=None, pool_cells=None):
    """agentsd on the joint attention of a diffusers `Attention` module (SD3's `attn`, or the
    image-only `attn2` of SD 3.5 called with c None), in float64.

    x: image tokens (B, N, C) on the patch grid; c: text tokens (B, L, C_text) or None; dst: the
    destination positions (one per whole cell); `ratio`: ToMe merge ratio; `agent_ratio`: the
    agents' merge ratio, None for the ToMe-only phase. Options as in reference.py: `match_x`
    ranks and matches by another tensor of x's shape; `pool_cells=(h, w, sx, sy)` makes the
    agents the means of the whole cells (n = their number).

    Returns (image_out (B, N, out_dim), text_out (B, L, ...) or None, used_agents): text_out is
    through `to_add_out`, or the heads-merged attention output when `context_pre_only`."""
    heads = attn.heads
    batch, num_tokens, _ = x.shape
    inner = attn.to_k.weight.shape[0]
    d = inner // heads
    s = d**-0.5
    dst = [int(p) for p in dst]
    dst_set = set(dst)
    src = [p for p in range(num_tokens) if p not in dst_set]
    r = min(len(src), math.floor(num_tokens * ratio))
    merged_count = num_tokens - r  # N': image tokens only
    use_agents = False
    if agent_ratio is not None:
        r_agent = min(len(src), math.floor(num_tokens * agent_ratio))
        num_agents = len(dst) if pool_cells is not None else num_tokens - r_agent
        use_agents = 2 * num_agents < merged_count
    image_outputs, text_outputs = [], []
    for b in range(batch):
        xb = x[b].double()
        best, order = _match(xb if match_x is None else match_x[b].double(), dst, src)
        xm, slot = _merge(xb, dst, src, best, order, r)
        q_img = _heads(_linear(attn.to_q, xm), heads, attn.norm_q)
        k_img = _heads(_linear(attn.to_k, xm), heads, attn.norm_k)
        v_img = _heads(_linear(attn.to_v, xm), heads)
        if c is not None:
            cb = c[b].double()
            q_txt = _heads(_linear(attn.add_q_proj, cb), heads, attn.norm_added_q)
            k_txt = _heads(_linear(attn.add_k_proj, cb), heads, attn.norm_added_k)
            v_txt = _heads(_linear(attn.add_v_proj, cb), heads)
        if use_agents:
            if pool_cells is not None:
                agent_tokens = _cell_means(xb, pool_cells)
            else:
                agent_tokens = _merge(xb, dst, src, best, order, num_tokens - num_agents)[0]
            agents = _heads(_linear(attn.to_q, agent_tokens), heads, attn.norm_q)
        image_heads, text_heads = [], []
        for hd in range(heads):
            keys = k_img[hd] if c is None else torch.cat([k_img[hd], k_txt[hd]])
            values = v_img[hd] if c is None else torch.cat([v_img[hd], v_txt[hd]])
            if use_agents:
                agent_v = _softmax_attention(agents[hd], keys, values, s)
                o = _softmax_attention(q_img[hd], agents[hd], agent_v, s**k_scale2) + k_shortcut * v_img[hd]
            else:
                o = _softmax_attention(q_img[hd], keys, values, s)
            image_heads.append(o)
            if c is not None:
                text_heads.append(_softmax_attention(q_txt[hd], keys, values, s))
        o = _linear(attn.to_out[0], torch.cat(image_heads, dim=-1))
        image_outputs.append(torch.stack([o[slot[p]] for p in range(num_tokens)]))
        if c is not None:
            t = torch.cat(text_heads, dim=-1)
            text_outputs.append(t if attn.context_pre_only else _linear(attn.to_add_out, t))
    text_out = torch.stack(text_outputs) if c is not None else None
    return torch.stack(image_outputs), text_out, use_agents
