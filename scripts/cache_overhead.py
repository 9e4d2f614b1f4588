"""What FirstBlockCache adds to a computed model call of Flux.1-dev, timed alone: the tensor work
diffusers' hooks do on such a call (diffusers 0.42.1, hooks/first_block_cache.py): the head
block's residual and its relative change against the previous call's (an `.item()` included),
and the tail block's residuals of the image and text streams. Random tensors of the shapes at
the given size (4096 image tokens at 1024 px, 512 text tokens, width 3072); median of the repeats.
The number to read against the bench's computed steps (`agentsd bench --cache first-block`).

    python scripts/cache_overhead.py --sizes 1024 --repeats 20 --out docs/bench/cpu-first-block-overhead.md
"""

import argparse
import platform
import statistics
import time

import diffusers
import torch

WIDTH, TEXT_TOKENS = 3072, 512  # Flux.1-dev's


def hook_work(image: torch.Tensor, text: torch.Tensor, previous: torch.Tensor) -> float:
    """The first-block hooks' work on a computed call (block outputs stood in by their inputs + 1)."""
    out_image, out_text = image + 1, text + 1
    residual = out_image - image  # FBCHeadBlockHook: the head block's residual
    change = ((residual - previous).abs().mean() / previous.abs().mean()).item()  # ... against the last call's
    _ = out_image - out_image, out_text - out_text  # FBCBlockHook (tail): the residuals of both streams
    return change


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="also write the lines to this Markdown file")
    args = parser.parse_args()
    lines = [
        f"Command: `python scripts/cache_overhead.py --sizes {' '.join(map(str, args.sizes))} --repeats "
        f"{args.repeats}`; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, diffusers {diffusers.__version__}, fp32",
        "",
    ]
    for size in args.sizes:
        tokens = (size // 16) ** 2
        image, text = torch.randn(1, tokens, WIDTH), torch.randn(1, TEXT_TOKENS, WIDTH)
        previous = torch.randn_like(image)
        for _ in range(3):
            hook_work(image, text, previous)
        work, outputs = [], []  # the stand-in outputs' own cost is subtracted
        for _ in range(args.repeats):
            start = time.perf_counter()
            hook_work(image, text, previous)
            work.append(time.perf_counter() - start)
            start = time.perf_counter()
            _ = image + 1, text + 1
            outputs.append(time.perf_counter() - start)
        ms = (statistics.median(work) - statistics.median(outputs)) * 1000
        lines.append(f"- Flux.1-dev {size} px ({tokens} image + {TEXT_TOKENS} text tokens): FirstBlockCache's own "
                     f"work on a computed call {ms:.1f} ms (median of {args.repeats})")  # fmt: skip
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
