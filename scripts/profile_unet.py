"""How much of the patched layers' time goes to agent selection, over one whole UNet call.

Runs one CFG step (batch 2) of a random-weight UNet (`--arch`, default SD 1.5) patched with
each variant below, and accumulates wall time spent inside the patched processors and, within
them, in agent selection: the matching with its merge plans (`AgentSDProcessor.merges`), the
merges and unmerges (`TokenMerge.merge` / `unmerge`) and the cell means of pooled agents.
The share printed is selection time / patched-layer time. Medians over `--repeats` calls after
one warm-up call. On CUDA every timed section synchronizes, which adds a little to each.

    python scripts/profile_unet.py --sizes 512 768 --repeats 3
"""

import argparse
import statistics
import time
from collections import defaultdict

import torch

import agentsd
from agentsd.bench.benchmark import AGENTSD_METHODS, build_unet, unet_inputs
from agentsd.core import merge
from agentsd.processors import self_attention

# Row label -> the benchmark method whose config overrides it runs.
VARIANTS = {
    "agent phase (default)": "agentsd-agent",
    "agent phase, share_matching": "agentsd-shared",
    "agent phase, pooled agents": "agentsd-pool",
    "agent phase, pooled agents, ratio 0": "agentsd-pool-r0",
    "ToMe phase (default)": "agentsd-tome",
}
# (owner, attribute, bucket): the functions timed, and whether they count as selection.
TIMED = [
    (self_attention.AgentSDProcessor, "__call__", "layers"),
    (self_attention.AgentSDProcessor, "merges", "selection"),
    (merge.TokenMerge, "merge", "selection"),
    (merge.TokenMerge, "unmerge", "selection"),
    (self_attention, "cell_means", "selection"),
]


class Clock:
    """Wraps the TIMED functions to add their wall time to per-bucket totals."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self.saved = []

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        for owner, name, bucket in TIMED:
            original = getattr(owner, name)
            self.saved.append((owner, name, original))
            setattr(owner, name, self.timed(original, bucket))
        return self

    def timed(self, fn, bucket):
        def wrapper(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.totals[bucket] += (time.perf_counter() - start) * 1000
            return out

        return wrapper

    def __exit__(self, *exc):
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)


def profile(unet, size, repeats, overrides):
    """Median (UNet ms, patched-layer ms, selection ms) of one step with `overrides`."""
    args, kwargs = unet_inputs(unet, size, 1)
    agentsd.patch(unet, agentsd.AgentSDConfig(**overrides))
    samples = []
    try:
        with torch.no_grad():
            for index in range(repeats + 1):
                with Clock(unet.device) as clock:
                    clock.sync()
                    start = time.perf_counter()
                    unet(*args, **kwargs)
                    clock.sync()
                    total = (time.perf_counter() - start) * 1000
                if index:
                    samples.append((total, clock.totals["layers"], clock.totals["selection"]))
    finally:
        agentsd.unpatch(unet)
    return tuple(statistics.median(s[i] for s in samples) for i in range(3))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    )
    unet = build_unet(args.arch, device, dtype)
    print("| size | variant | UNet ms | patched layers ms | selection ms | selection share |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for name, method in VARIANTS.items():
            total, layers, selection = profile(unet, size, args.repeats, AGENTSD_METHODS[method])
            share = 100 * selection / layers
            print(f"| {size} | {name} | {total:.0f} | {layers:.1f} | {selection:.1f} | {share:.1f} % |", flush=True)


if __name__ == "__main__":
    main()
