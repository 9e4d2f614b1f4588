"""The one-step parts: `agentsd bench` scenarios (`benchmark.run_benchmark`) on the real UNets.

    sd15          SD 1.5 at 512, 1024, 2048 px with 1 image and at 512, 1024 px with 4 images:
                  baseline, xformers (where it runs), the paper preset's agent and ToMe
                  phases and their 50-step schedule, `highres`, tomesd at the same ratio, and
                  the ceiling at one and at two levels
    sd15-compile  SD 1.5 at 1024 px: baseline and agent phase eager and under torch.compile
                  (inductor), the ceiling eager
    sd15-compile-ceiling
                  SD 1.5 at 1024 px: baseline and ceiling eager and compiled
                  Parts of their own, two compilations each: one compilation of a whole
                  UNet can take minutes. The compiled agent phase's share of the compiled
                  ceiling's speedup combines the two (each against its own compiled baseline).
    sdxl          SDXL at 1024 and 2048 px with the `sdxl` preset, SD 2.1 at 768 px with `sd21`

Each scenario's rows are written as soon as it finishes (an interrupted part keeps them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .. import benchmark
from .common import PartContext

logger = logging.getLogger(__name__)

SD15_METHODS = ("baseline", "xformers", "agentsd-agent", "agentsd-tome", "highres", "tomesd", "ceiling", "ceiling-2")
SDXL_METHODS = ("baseline", "xformers", "agentsd-agent", "agentsd-tome", "tomesd", "ceiling")
COMPILED_AGENT = ("baseline", "agentsd-agent")
COMPILED_CEILING = ("baseline", "ceiling")
REPEATS, WARMUP = 10, 2  # per method and scenario on the GPU
# The tiny stand-ins (agentsd.testing) and the image side they run at in --tiny mode.
TINY_ARCHS = {"sd15": "tiny", "sd21": "tiny-sd2", "sdxl": "tiny-sdxl"}
TINY_SIZE = 128


@dataclass(frozen=True)
class UNetPlan:
    """One `run_benchmark` call of a part: an architecture's scenarios and methods.

    Args:
        arch: `sd15`, `sd21` or `sdxl`.
        sizes, batches: image sides and images per prompt (every combination is a scenario).
        methods: the methods to time (those that cannot run here are left out).
        preset: the agentsd preset; None: the architecture's default (`paper`, `sd21`, `sdxl`).
        compiled: the methods also timed under torch.compile.
    """

    arch: str
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    methods: tuple[str, ...]
    preset: str | None = None
    compiled: tuple[str, ...] = ()


PLANS: dict[str, tuple[UNetPlan, ...]] = {
    "sd15": (
        UNetPlan("sd15", (512, 1024, 2048), (1,), SD15_METHODS),
        UNetPlan("sd15", (512, 1024), (4,), SD15_METHODS),
    ),
    "sd15-compile": (UNetPlan("sd15", (1024,), (1,), (*COMPILED_AGENT, "ceiling"), compiled=COMPILED_AGENT),),
    "sd15-compile-ceiling": (UNetPlan("sd15", (1024,), (1,), COMPILED_CEILING, compiled=COMPILED_CEILING),),
    "sdxl": (UNetPlan("sdxl", (1024, 2048), (1,), SDXL_METHODS), UNetPlan("sd21", (768,), (1,), SDXL_METHODS)),
}


def tiny_plan(plan: UNetPlan) -> UNetPlan:
    """The plan on the tiny stand-in of its architecture, at one small size."""
    return replace(plan, arch=TINY_ARCHS[plan.arch], sizes=(TINY_SIZE,))


def xformers_runs(device: torch.device) -> bool:
    """Whether xformers' kernel runs on `device` (an installed wheel built for another torch or
    CUDA imports, then fails when called)."""
    try:
        import xformers.ops

        q = torch.zeros(1, 8, 1, 8, device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as err:  # any failure means: no xformers rows here
        logger.warning("xformers does not run here: %s: %s", type(err).__name__, err)
        return False
    return True


def runnable(methods: tuple[str, ...], context: PartContext) -> list[str]:
    """`methods` without those that cannot run here (xformers off CUDA, not installed or not
    working; tomesd not installed)."""
    available = set(benchmark.available_methods(context.device)) | set(benchmark.OPTIONAL_METHODS)
    if "xformers" in available and not xformers_runs(context.device):
        available.remove("xformers")
    left_out = [m for m in methods if m not in available]
    if left_out:
        logger.warning("left out (cannot run here): %s", ", ".join(left_out))
    return [m for m in methods if m in available]


def run_plans(part: str, context: PartContext) -> dict[str, Path]:
    """Run the part's plans and write its files (`benchmark.write_results`) after every scenario."""
    folder = context.folder(part)
    rows: list[dict[str, Any]] = []
    paths: dict[str, Path] = {}

    def save(new_rows: list[dict[str, Any]]) -> None:
        rows.extend(new_rows)
        paths.update(benchmark.write_results(rows, folder, context.command))

    for plan in PLANS[part]:
        if context.tiny:
            plan = tiny_plan(plan)
        compiled = list(plan.compiled)
        benchmark.run_benchmark(
            archs=[plan.arch],
            sizes=plan.sizes,
            batches=plan.batches,
            methods=runnable(plan.methods, context),
            preset=plan.preset,
            repeats=1 if context.tiny else REPEATS,
            warmup=0 if context.tiny else WARMUP,
            device=context.device,
            dtype=context.dtype,
            # Dynamo's eager backend in --tiny mode: the harness is checked, not inductor.
            compile=("eager" if context.tiny else "inductor") if compiled else None,
            compile_methods=compiled,
            progress=False,
            on_rows=save,
        )
    if not rows:  # every scenario ran out of memory: still write the (empty) files
        paths.update(benchmark.write_results(rows, folder, context.command))
    return paths


def run_sd15(context: PartContext) -> dict[str, Path]:
    """The `sd15` part."""
    return run_plans("sd15", context)


def run_sd15_compile(context: PartContext) -> dict[str, Path]:
    """The `sd15-compile` part."""
    return run_plans("sd15-compile", context)


def run_sd15_compile_ceiling(context: PartContext) -> dict[str, Path]:
    """The `sd15-compile-ceiling` part."""
    return run_plans("sd15-compile-ceiling", context)


def run_sdxl(context: PartContext) -> dict[str, Path]:
    """The `sdxl` part."""
    return run_plans("sdxl", context)
