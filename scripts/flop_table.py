"""The FLOP table of a denoising step: how much of it the self-attention products are, and the
speedups the FLOPs bound, counted on the meta device (no weights, no timing; seconds per row).

    python scripts/flop_table.py --arch wan2.1-1.3b wan2.1-14b --sizes 480x832 720x1280 --frames 81
    python scripts/flop_table.py --arch wan2.1-1.3b --blocks 1 --sizes 480x832 --frames 5 17 81 --out DIR

Every architecture at every size (and, for videos, every frame count) it takes; a combination
an architecture cannot take is left out, saying why. One row per step of one image or video with
guidance (Wan: the transformer's two calls), the columns of `agentsd.suite.flops.step_flops`:
`products_share` is the patched layers' attention products over the step (what the
`ceiling-products` method drops), `products_bound` the step's speedup with them free,
`ceiling_bound` with the patched layers free, projections too, and `agent_speedup` /
`schedule_speedup` the preset's agent phase and its 50-step mix with the ToMe phase. With
`--out`, the table is written as results.md, results.json and results.csv (with the command,
the versions and the commit).
"""

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's agentsd, whose commit the files record

import torch  # noqa: E402

from agentsd.bench import benchmark  # noqa: E402
from agentsd.bench.results import run_info, write_tables  # noqa: E402
from agentsd.bench.transformer_models import size_problem  # noqa: E402
from agentsd.bench.wan_models import frames_problem  # noqa: E402
from agentsd.cli.args import bench_size  # noqa: E402
from agentsd.suite.flops import FLOP_COLUMNS, flop_table, step_flops  # noqa: E402

# What a row was counted on, in the files' device column.
COUNTED_ON = "meta device (FLOPs counted with torch.utils.flop_counter, nothing run)"


def cases(archs: list[str], sizes: list, frames: list[int]) -> tuple[list[tuple], list[str]]:
    """(arch, size, frames) of every combination an architecture takes, and why the others are left out."""
    found, left_out = [], []
    for arch in archs:
        for size in sizes or benchmark.default_sizes(arch):
            problem = size_problem(arch, size) if benchmark.is_transformer(arch) else None
            if problem:
                shown = "x".join(map(str, size)) if isinstance(size, tuple) else f"{size} px"
                left_out.append(f"{arch} at {shown}: {problem}")
                continue
            for count in (frames or [81]) if benchmark.is_video(arch) else [None]:
                if count is not None and (problem := frames_problem(count)):
                    left_out.append(f"{arch} at {count} frames: {problem}")
                    continue
                found.append((arch, size, count))
    return found, left_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", required=True, choices=list(benchmark.DEFAULT_PRESETS), metavar="ARCH",
                        help="architectures, as agentsd bench names them")  # fmt: skip
    parser.add_argument("--blocks", type=int, metavar="K", help="the transformers' first K blocks only")
    parser.add_argument("--sizes", nargs="+", type=bench_size, metavar="SIZE",
                        help="PX (images) or HxW (videos); default as agentsd bench's")  # fmt: skip
    parser.add_argument("--frames", nargs="+", type=int, metavar="F", help="video frames, 4k+1 (default 81)")
    parser.add_argument("--preset", help="agentsd preset (default: each architecture's)")
    parser.add_argument("--out", type=Path, help="also write results.md, .json and .csv into this folder")
    args = parser.parse_args(argv)
    found, left_out = cases(benchmark.with_blocks(args.arch, args.blocks), args.sizes, args.frames)
    info = dict(run_info(torch.device("cpu")), device=COUNTED_ON)
    rows = [dict(step_flops(arch, size, count, args.preset), **info) for arch, size, count in found]
    notes = "".join(f"\nLeft out: {line}." for line in left_out)
    markdown = flop_table(rows) + notes + ("\n" if notes else "")
    print(markdown, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python scripts/flop_table.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        columns = [*FLOP_COLUMNS, "blocks", "width", "frames", *info]
        write_tables(args.out, rows, columns, markdown, command, extrasaction="ignore")
    return 0


if __name__ == "__main__":
    sys.exit(main())
