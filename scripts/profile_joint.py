"""One patched SD 3.5 Medium attention layer against SDPA: the break-even grid and where the time goes.

Times the two attention layers of one SD 3.5 Medium dual-attention block (1536 wide, 24 heads
of 64, RMS QK norms): the joint attention over the image tokens and 333 text tokens (77 CLIP +
256 T5, as the pipeline passes them) and the image-only `attn2`, with diffusers' processor and
with agentsd's in each phase of a preset (`sd3` by default), over square patch grids; then the
parts of an agentsd joint call one by one: matching, merges, the image projections (q, k, v and
out over the merged tokens), the text projections (add_q, add_k, add_v, to_add_out), the
agents' query projection, the attention products, the unmerge. Random weights and inputs, `--batch`
sequences (2: one image with CFG), the median of the repeats after one untimed call.

The recommended `min_tokens` is the token count of the smallest grid from which agentsd is
faster than the baseline at every larger grid measured, in both phases and both layers (the
suite's breakeven rule).

    python scripts/profile_joint.py --grids 16 24 32 40 48 64 --parts 32 64 --repeats 5
"""

import argparse
import statistics
import time
from functools import partial

import torch
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.attention_processor import JointAttnProcessor2_0

from agentsd.api.presets import load_preset
from agentsd.bench.transformer_models import SD3_TEXT_TOKENS, SD35_MEDIUM
from agentsd.core.attention import agent_attention, attend
from agentsd.core.merge import bipartite_matching
from agentsd.core.state import AGENT, AgentSDState
from agentsd.processors.joint_attention import JointAgentSDProcessor
from agentsd.suite.breakeven import recommend_min_tokens

PHASES = {"agent": 999, "tome": 100}  # timesteps in each phase of a preset with agent_steps 0.4


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def sd35_block():
    """One SD 3.5 Medium dual-attention block, as the model builds its first 13."""
    config = SD35_MEDIUM.config
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    torch.manual_seed(0)
    block = JointTransformerBlock(dim=heads * head_dim, num_attention_heads=heads, attention_head_dim=head_dim,
                                  context_pre_only=False, qk_norm=config["qk_norm"],
                                  use_dual_attention=True)  # fmt: skip
    return block.eval()


def patched(attn, config, grid, batch, timestep):
    """`attn` with agentsd's joint processor planned for one call at `timestep` on a grid x grid
    patch grid; returns the layer plan."""
    state = AgentSDState(config)
    attn.set_processor(JointAgentSDProcessor(JointAttnProcessor2_0(), state, "layer"))
    state.begin_call(torch.zeros(batch, 1, grid, grid), torch.tensor(timestep), (grid, grid))
    return state.call.plans["layer"]


def layer_rows(attn, call, layer, config, grid, batch, repeats):
    """The baseline and each phase of one layer at one grid."""
    attn.set_processor(JointAttnProcessor2_0())
    base = median_ms(lambda: call(attn), repeats)
    rows = []
    for phase, timestep in PHASES.items():
        patched(attn, config, grid, batch, timestep)
        mine = median_ms(lambda: call(attn), repeats)
        attn.set_processor(JointAttnProcessor2_0())
        rows.append(dict(layer=layer, grid=grid, tokens=grid * grid, phase=phase, baseline_ms=base, agentsd_ms=mine,
                         speedup=base / mine))  # fmt: skip
        print(f"| {layer} | {grid * grid} ({grid}x{grid}) | {phase} | {base:.1f} | {mine:.1f} | {base / mine:.2f}x |",
              flush=True)  # fmt: skip
    return rows


def breakeven_rows(block, config, grids, batch, repeats):
    rows = []
    width = block.attn.inner_dim
    for grid in grids:
        x = torch.randn(batch, grid * grid, width)
        text = torch.randn(batch, SD3_TEXT_TOKENS, width)
        rows += layer_rows(block.attn, partial(joint_call, x=x, text=text), "joint", config, grid, batch, repeats)
        rows += layer_rows(block.attn2, partial(joint_call, x=x), "attn2", config, grid, batch, repeats)
    return rows


def joint_call(attn, x, text=None):
    return attn(x) if text is None else attn(x, encoder_hidden_states=text)


def phase_parts(attn, config, x, text, grid, timestep, repeats):
    """(mode, agentsd joint ms, its parts in ms, timed one by one) at `timestep`."""
    batch = x.shape[0]
    heads, head_dim = attn.heads, attn.inner_dim // attn.heads

    def split(t):
        return t.view(batch, -1, heads, head_dim).transpose(1, 2)

    plan = patched(attn, config, grid, batch, timestep)
    total = median_ms(lambda: attn(x, encoder_hidden_states=text), repeats)
    attn.set_processor(JointAttnProcessor2_0())
    parts = {"matching": median_ms(lambda: bipartite_matching(x, plan.dst, plan.src), repeats)}
    matching = bipartite_matching(x, plan.dst, plan.src)
    merge = matching.plan(plan.r)
    parts["merge"] = median_ms(lambda: matching.plan(plan.r).merge(x), repeats)
    xm = merge.merge(x)
    parts["image projections"] = median_ms(
        lambda: attn.to_out[0](attn.to_q(xm) + attn.to_k(xm) + attn.to_v(xm)), repeats
    )
    parts["text projections"] = median_ms(
        lambda: attn.to_add_out(attn.add_q_proj(text) + attn.add_k_proj(text) + attn.add_v_proj(text)), repeats
    )
    q, k, v = split(attn.to_q(xm)), split(attn.to_k(xm)), split(attn.to_v(xm))
    tq, tk, tv = split(attn.add_q_proj(text)), split(attn.add_k_proj(text)), split(attn.add_v_proj(text))
    parts["qk norms"] = median_ms(
        lambda: (attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(tq), attn.norm_added_k(tk)), repeats
    )
    keys, values = torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2)
    scale = head_dim**-0.5
    if plan.mode == AGENT:
        parts["agent merge"] = median_ms(lambda: matching.plan(plan.r_agent).merge(x), repeats)
        tokens = matching.plan(plan.r_agent).merge(x)
        parts["agent projection"] = median_ms(lambda: attn.to_q(tokens), repeats)
        agents = split(attn.to_q(tokens))
        parts["image attention"] = median_ms(
            lambda: agent_attention(q, keys, values, agents, scale, config.k_scale2, config.k_shortcut, "sdpa",
                                    shortcut=v), repeats,
        )  # fmt: skip
        parts["text attention"] = median_ms(lambda: attend(tq, keys, values, scale), repeats)
    else:
        queries = torch.cat([q, tq], dim=2)
        parts["image attention"] = median_ms(lambda: attend(queries, keys, values, scale), repeats)
    image = torch.randn(batch, merge.size, attn.inner_dim)
    parts["unmerge"] = median_ms(lambda: merge.unmerge(image), repeats)
    return plan.mode, total, parts


def parts_rows(block, config, grid, batch, repeats):
    """The parts of one agentsd joint call per phase (the image and text attention products
    together in the ToMe phase, where they are one call)."""
    x = torch.randn(batch, grid * grid, block.attn.inner_dim)
    text = torch.randn(batch, SD3_TEXT_TOKENS, block.attn.inner_dim)
    return [(phase, *phase_parts(block.attn, config, x, text, grid, t, repeats)) for phase, t in PHASES.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grids = [16, 24, 32, 40, 48, 64]
    parser.add_argument("--grids", nargs="*", type=int, default=grids, help="patch-grid sides (none: skip)")
    parser.add_argument("--parts", nargs="*", type=int, default=[32, 64], help="grids split into parts (none: skip)")
    parser.add_argument("--preset", default="sd3")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2, help="sequences per call (2: one image with CFG)")
    args = parser.parse_args()
    config = load_preset(args.preset).replace(min_tokens=0)  # every grid patched: the floor is measured
    block = sd35_block()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, batch {args.batch}, "
          f"{SD3_TEXT_TOKENS} text tokens, median of {args.repeats}\n")  # fmt: skip
    with torch.no_grad():
        if args.grids:
            print("| layer | image tokens (grid) | phase | baseline ms | agentsd ms | speedup |")
            print("|---|---|---|---|---|---|")
            rows = breakeven_rows(block, config, args.grids, args.batch, args.repeats)
            advice = recommend_min_tokens(rows)
            print(f"\nRecommended min_tokens: {advice['min_tokens']} ({advice['rule']}; both layers).\n")
        names = ["matching", "merge", "agent merge", "image projections", "text projections", "agent projection",
                 "qk norms", "image attention", "text attention", "unmerge"]  # fmt: skip
        if args.parts:
            print("| image tokens | phase | agentsd joint ms | " + " | ".join(f"{n} ms" for n in names) + " |")
            print("|" + "---|" * (3 + len(names)))
        for grid in args.parts:
            for phase, mode, total, parts in parts_rows(block, config, grid, args.batch, args.repeats):
                cells = [f"{parts[n]:.1f}" if n in parts else "" for n in names]
                print(f"| {grid * grid} | {phase} ({mode}) | {total:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
