"""The context-parallel scenario: `agentsd bench --context-parallel P` over the machine's GPUs.

Wan 2.1 1.3B, the whole transformer in bf16, at 480x832 px and the pipelines' 81 frames (21 latent
frames, which the ranks' runs cut: each rank plans the whole frames of its run), Ulysses and ring:
the baseline (diffusers' exact attention across the GPUs), agentsd's agent and ToMe phases, time
per forward and the elements each GPU sends. P is the largest of 2, 3 and 4 the machine has GPUs
for (Ulysses splits Wan 1.3B's 12 heads over the ranks). The command runs in a subprocess (it
starts torchrun itself), writing its part's files (--tiny: the tiny Wan at 256 px, one call per
method, on the same GPUs). On a machine with fewer than two GPUs the scenario is skipped, saying
how many it has.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import torch

from .budget import Cost
from .common import Outcome, PartContext

logger = logging.getLogger(__name__)

PART = "context-parallel"
ARCH, SIZE, FRAMES = "wan2.1-1.3b", "480x832", 81
RANKS = (2, 3, 4)  # divide Wan 1.3B's 12 heads and the 24 latent frames
REPEATS, WARMUP = 5, 1
# torchrun's start, two builds of the 1.3B model (one per mode) and 3 methods x 2 modes x 7 calls
# of an 81-frame-sized call each: pessimistic seconds on H100s.
PRIOR_S = 240.0
TINY_PRIOR_S = 60.0  # torchrun's start and the imports of 3 processes dominate


def gpus() -> int:
    """The CUDA devices this process sees."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def unavailable(context: PartContext) -> str:
    """Why the scenario cannot run here ("" where it can): it needs two or more GPUs."""
    count = gpus()
    return "" if count >= 2 else f"{count} GPU{'' if count == 1 else 's'}: context parallelism needs 2 or more"


def ranks(tiny: bool = False) -> int:
    """P: the largest of `RANKS` the machine has GPUs for (--tiny: 2, the tiny Wan's heads)."""
    return RANKS[0] if tiny else max(p for p in RANKS if p <= max(gpus(), RANKS[0]))


def cost(tiny: bool, built: str | None) -> Cost:
    return {"seconds": TINY_PRIOR_S if tiny else PRIOR_S}


def command(out: str, tiny: bool = False) -> list[str]:
    """The bench command of the scenario, writing into `out` (--tiny: the tiny Wan, one call per method)."""
    if tiny:
        scenario = ["--arch", "tiny-wan", "--sizes", "256", "--frames", "5", "--repeats", "1", "--warmup", "0"]
    else:
        scenario = ["--arch", ARCH, "--sizes", SIZE, "--frames", str(FRAMES), "--dtype", "bf16", "--repeats",
                    str(REPEATS), "--warmup", str(WARMUP)]  # fmt: skip
    return [sys.executable, "-m", "agentsd", "bench", "--context-parallel", str(ranks(tiny)), *scenario, "--out", out]


def run(context: PartContext) -> Outcome:
    """Run the command and read its rows into the headline: each mode's speedups and traffic ratios."""
    folder = context.folder(PART)
    timeout = max(context.seconds_left(), 30.0)
    # A session of its own: on a timeout torchrun and its ranks are stopped with the command.
    process = subprocess.Popen(command(str(folder), context.tiny), cwd=context.root, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        log, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        log = process.communicate()[0] + f"\ntimed out after {timeout:.0f} s"
    (folder / "bench.log").write_text(log)
    if process.returncode:
        raise RuntimeError(f"agentsd bench --context-parallel exited {process.returncode}: see {PART}/bench.log")
    rows = json.loads((folder / "results.json").read_text())["rows"]
    parts = [f"{r['mode']} {r['method']} {r['speedup']:.2f}x, {r['layer_ratio']:.1f}x fewer elements per layer"
             for r in rows if r["method"] != "baseline"]  # fmt: skip
    base = next(r["median_ms"] for r in rows if r["method"] == "baseline")
    return Outcome(headline=f"{rows[0]['ranks']} GPUs: " + "; ".join(parts), baseline_ms=base)
