"""The count table of context parallelism: elements each rank sends per layer and per forward, the
baseline (diffusers' Ulysses, ring) against agentsd's agent and ToMe phases, from the formulas of
`agentsd/bench/traffic.py` (nothing is run; `agentsd bench --context-parallel` counts them in a run).

    python scripts/traffic_table.py
    python scripts/traffic_table.py --case flux-dev 1024 --case wan2.1-14b 720x1280 --frames 81 93 --out DIR

One row per case, frame count (videos) and rank count P, the whole model (Flux.1-dev: 19 double-
and 38 single-stream blocks; Wan: every block) at batch 1 with each architecture's preset. A forward
is one transformer call: a Flux.1-dev step, one of the two calls of a Wan step with guidance.
Where Ulysses cannot split the heads over P ranks its columns are empty; where agentsd's plan
hands a shard to diffusers (a video whose token frames do not split over P ranks) its columns
are the baseline's. With `--out`, the tables are written as results.md, results.json and
results.csv (with the command, the versions and the commit).
"""

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's agentsd, whose commit the files record

import torch  # noqa: E402

from agentsd.api.presets import load_preset  # noqa: E402
from agentsd.bench.benchmark import DEFAULT_PRESETS, is_video  # noqa: E402
from agentsd.bench.results import run_info, write_tables  # noqa: E402
from agentsd.bench.targets import size_text  # noqa: E402
from agentsd.bench.traffic import shard_layout  # noqa: E402
from agentsd.bench.transformer_models import FLUX_TEXT_TOKENS, TRANSFORMERS, sides  # noqa: E402
from agentsd.cli.args import bench_size  # noqa: E402
from agentsd.core.plans import AGENT  # noqa: E402

CASES = [("flux-dev", "1024"), ("flux-dev", "2048"), ("wan2.1-1.3b", "480x832"), ("wan2.1-14b", "720x1280")]
COUNTED_ON = "formulas (agentsd/bench/traffic.py), nothing run"
NOTES = (
    f"Flux shards its {FLUX_TEXT_TOKENS} T5 text tokens with the image: each rank holds 512 / P of them, which join "
    "every layer's sequence; agentsd's agent phase all-gathers each rank's text queries with its agents and returns "
    "their partial outputs to their owner (the design of agentsd's sharded Flux path), its ToMe phase attends exactly "
    "over the merged image tokens and the text. Wan shards only its video tokens (its cross-attention stays local).",
    "Elements: what one rank hands to the collectives (an all-to-all's whole input, an all-gather's own part), batch "
    "1, every head; a forward adds the output gather (tokens per rank x 64 channels) to its layers.",
)


def row(arch: str, size, frames: int | None, ranks: int) -> dict:
    """The counts of one case over `ranks` ranks."""
    config = load_preset(DEFAULT_PRESETS[arch])
    layout = shard_layout(arch, size, frames, ranks, config)
    heads = TRANSFORMERS[arch].config["num_attention_heads"]
    agent, tome = layout.plan("agentsd-agent"), layout.plan("agentsd-tome")
    acts = agent.action == AGENT
    height, width = sides(size)
    found = dict(arch=arch, size=height, width=width if frames else None, frames=frames, ranks=ranks,
                 tokens=layout.tokens, text=layout.text, agents=agent.agents, merged=tome.merged,
                 layers=layout.layers, agentsd=agent.action if acts else handed_over(layout, frames))  # fmt: skip
    for scope, count in (("layer", layout.layer_elements), ("forward", layout.forward_elements)):
        fits = heads % ranks == 0  # Ulysses splits the heads
        found[f"{scope}_ulysses"] = count("ulysses") if fits else None
        found[f"{scope}_ring"] = count("ring")
        found[f"{scope}_agent"] = count("ring", agent) if acts else None  # the same in either mode
        found[f"{scope}_tome_ulysses"] = count("ulysses", tome) if fits else None
        found[f"{scope}_tome_ring"] = count("ring", tome)
        for mode in ("ulysses", "ring"):  # 1.0 where agentsd hands the layers to diffusers
            base, mine = found[f"{scope}_{mode}"], found[f"{scope}_agent"]
            found[f"{scope}_{mode}_ratio"] = (round(base / mine, 2) if mine else 1.0) if base else None
    return found


def handed_over(layout, frames: int | None) -> str:
    """Why agentsd's agent phase does not act on the shards, in words."""
    if layout.grid is None:
        what = "token frames" if frames else "token rows"
        return f"hands over ({what} do not split over {layout.ranks} ranks)"
    return "exact (the shard's plan: too small for agents)"


def markdown(rows: list[dict], scope: str) -> str:
    """One table of `rows`: per layer (elements) or per forward (millions of elements)."""
    unit = "" if scope == "layer" else " (M)"
    header = ["arch", "size", "P", "tokens / rank (image + text)", "agents / rank", "agentsd acts", f"Ulysses{unit}",
              f"ring{unit}", f"agentsd agent phase{unit}", f"agentsd ToMe phase, Ulysses / ring{unit}",
              "Ulysses / agent", "ring / agent"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def count(value):
        if value is None:
            return "-"
        return f"{value:,}" if scope == "layer" else f"{value / 1e6:,.1f}"

    for r in rows:
        tome = f"{count(r[f'{scope}_tome_ulysses'])} / {count(r[f'{scope}_tome_ring'])}"
        ratios = [f"{r[f'{scope}_{m}_ratio']:.1f}x" if r[f"{scope}_{m}_ratio"] else "-" for m in ("ulysses", "ring")]
        cells = [r["arch"], size_text(r["size"], r["width"], r["frames"]), r["ranks"],
                 f"{r['tokens']:,} + {r['text']}", r["agents"] or "-", r["agentsd"], count(r[f"{scope}_ulysses"]),
                 count(r[f"{scope}_ring"]), count(r[f"{scope}_agent"]), tome, *ratios]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def presets_line(archs: list[str]) -> str:
    """The presets' cells and agent ratios, as the table uses them."""
    parts = []
    for name in dict.fromkeys(DEFAULT_PRESETS[a] for a in archs):
        c = load_preset(name)
        cells = f"{c.st}x{c.sy}x{c.sx} boxes" if c.st > 1 else f"{c.sy}x{c.sx} cells"
        late = f"{c.late_st}x{c.late_sy}x{c.late_sx}" if c.late_st > 1 or c.st > 1 else f"{c.late_sy}x{c.late_sx}"
        parts.append(f"`{name}` ({cells}, agent_ratio {c.agent_ratio}; ToMe phase ratio {c.late_ratio} over {late})")
    return ("Presets: " + "; ".join(parts) + ". Agents per rank: n_l = N_l - min(sources, floor(agent_ratio N_l)) "
            "over the rank's shard, one per whole box or cell where every source merges (more where partial boxes "
            "leave more sources than that).")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs=2, action="append", metavar=("ARCH", "SIZE"),
                        help="an architecture (flux-dev, wan*) and a size (PX, or HxW for videos); repeatable; "
                        "default: flux-dev 1024 and 2048, wan2.1-1.3b 480x832, wan2.1-14b 720x1280")  # fmt: skip
    parser.add_argument("--frames", nargs="+", type=int, default=[81], metavar="F", help="video frames, 4k+1")
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8], metavar="P", help="processes")
    parser.add_argument("--out", type=Path, help="also write results.md, .json and .csv into this folder")
    args = parser.parse_args(argv)
    cases = [(arch, bench_size(size)) for arch, size in (args.case or CASES)]
    rows = [row(arch, size, frames, ranks) for arch, size in cases
            for frames in (args.frames if is_video(arch) else [None]) for ranks in args.ranks]  # fmt: skip
    info = dict(run_info(torch.device("cpu")), device=COUNTED_ON)
    rows = [dict(r, **info) for r in rows]
    text = [presets_line([a for a, _ in cases]), *NOTES]
    page = "Per layer, elements per rank:\n\n" + markdown(rows, "layer")
    page += "\nPer forward (the whole model's layers and the output gather), millions of elements per rank:\n\n"
    page += markdown(rows, "forward") + "\n" + "\n\n".join(text) + "\n"
    print(page, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python scripts/traffic_table.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        write_tables(args.out, rows, list(rows[0]), page, command, extra=dict(notes=text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
