"""Where the time of one patched self-attention layer goes, per phase and resolution.

Times one SD 1.5 top-level self-attention layer (320 channels, 8 heads, the token count of
the given image size, `--batch` sequences: 2 is one image with CFG) with the baseline
processor and with agentsd in each phase, and the parts of the agentsd call one by one:
matching, merge (and the agent merge), projections, attention, unmerge. Random weights and
inputs; median of the repeats.

    python scripts/profile_layer.py --sizes 512 1024 2048 --repeats 3
"""

import argparse
import statistics
import time

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from agentsd import AgentSDConfig
from agentsd.core.attention import agent_attention, attend
from agentsd.core.merge import bipartite_matching
from agentsd.processors.self_attention import AGENT, AgentSDProcessor, AgentSDState


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def profile_phase(attn, x, side, timestep, repeats):
    """(mode, total ms, parts in ms) of one agentsd layer call at `timestep`."""
    state = AgentSDState(AgentSDConfig())
    processor = AgentSDProcessor(AttnProcessor2_0(), state, "layer")
    attn.set_processor(processor)
    batch = x.shape[0]
    state.begin_call(torch.zeros(batch, 4, side, side), torch.tensor(timestep))
    plan = processor.plan(attn, x)
    total = median_ms(lambda: attn(x), repeats)
    attn.set_processor(AttnProcessor2_0())
    matching = bipartite_matching(x, plan.dst, plan.src)
    parts = {"matching": median_ms(lambda: bipartite_matching(x, plan.dst, plan.src), repeats)}
    merge = matching.plan(plan.r)
    parts["merge"] = median_ms(lambda: matching.plan(plan.r).merge(x), repeats)
    xm = merge.merge(x)
    parts["projections"] = median_ms(lambda: attn.to_out[0](attn.to_q(xm) + attn.to_k(xm) + attn.to_v(xm)), repeats)
    q = attn.to_q(xm).view(batch, -1, 8, 40).transpose(1, 2)
    k, v = q.clone(), q.clone()
    if plan.mode == AGENT:
        parts["agent merge"] = median_ms(lambda: matching.plan(plan.r_agent).merge(x), repeats)
        a = attn.to_q(matching.plan(plan.r_agent).merge(x)).view(batch, -1, 8, 40).transpose(1, 2)
        parts["attention"] = median_ms(lambda: agent_attention(q, k, v.clone(), a, 40**-0.5, 0.3, 0.075), repeats)
    else:
        parts["attention"] = median_ms(lambda: attend(q, k, v, 40**-0.5), repeats)
    out = torch.randn(batch, merge.size, 320)
    parts["unmerge"] = median_ms(lambda: merge.unmerge(out), repeats)
    return plan.mode, total, parts


def profile(size, repeats, baseline, batch=2):
    side = size // 8
    torch.manual_seed(0)
    attn = Attention(320, heads=8, dim_head=40, out_bias=True).eval()
    x = torch.randn(batch, side * side, 320)
    with torch.no_grad():
        base = median_ms(lambda: attn(x), 1 if size >= 2048 else repeats) if baseline else None
        return [(size, side * side, *profile_phase(attn, x, side, t, repeats), base) for t in (999, 100)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="sequences per call (2: one image with CFG)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the (slow) baseline layer")
    args = parser.parse_args()
    names = ["matching", "merge", "agent merge", "projections", "attention", "unmerge"]
    print("| size | tokens | phase | baseline ms | agentsd ms | " + " | ".join(f"{n} ms" for n in names)
          + " | matching+merges share |")  # fmt: skip
    print("|" + "---|" * (6 + len(names)))
    for size in args.sizes:
        for size_, tokens, mode, total, parts, base in profile(size, args.repeats, not args.no_baseline, args.batch):
            overhead = parts["matching"] + parts["merge"] + parts.get("agent merge", 0) + parts["unmerge"]
            cells = [f"{parts[n]:.1f}" if n in parts else "" for n in names]
            base_cell = f"{base:.1f}" if base is not None else ""
            print(f"| {size_} | {tokens} | {mode} | {base_cell} | {total:.1f} | " + " | ".join(cells)
                  + f" | {100 * overhead / total:.0f} % |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
