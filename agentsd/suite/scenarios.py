"""The scenarios of the GPU suite and their default priority order.

A scenario is the smallest piece the budget runs or skips: one architecture at one size,
one tests selection, one breakeven batch, one pipeline size. Each writes into its part's
folder (several scenarios can share a part) and states its prior cost (`estimate.py`).

Default order (`DEFAULT_ORDER`), most wanted first:
  1. sd15-512, sd15-1024, sd15-2048   SD 1.5 fp16, 1 image: baseline, agent and ToMe phases
                                      (and their 50-step schedule), tomesd at the same ratio, ceiling
  2. sdxl-1024, sdxl-2048             SDXL fp16 with the `sdxl` preset, the same methods
  3. tests                            the short CUDA tests (`pytest -m gpu`, not the inductor one)
  4. breakeven-2, breakeven-8         the `min_tokens` break-even grids at CFG batches 2 and 8
  5. sd35-1024, sd35-2048             the whole SD 3.5 Medium transformer fp16 with the `sd3` preset:
                                      baseline, agent and ToMe phases (and schedule), ceiling
     flux-1024, flux-2048             the whole Flux.1-dev transformer bf16 (12 B parameters, 24 GB)
                                      with the `flux` preset, the same methods
     stack-flux-1024                  the same model at 1024 px with FirstBlockCache alone and with
                                      agentsd (`agentsd bench --cache`), per computed and skipped step:
                                      the stack over the cache alone against agentsd's own speedup
     wan-480p                         the whole Wan 2.1 1.3B transformer bf16, 81 frames at 480x832
                                      (32,760 tokens), `wan` preset: baseline (Wan's processor on the
                                      dispatcher's default backend), agent and ToMe phases (and
                                      schedule), ceiling-products; its peak memory checked first
  6. highres-2048                     `highres` and the two-level ceiling at 2048 px
  7. compile-agent-1024, compile-ceiling-1024, tests-compile
                                      baseline, agent phase and ceiling under torch.compile at
                                      1024 px (two compilations each), the inductor CUDA test
  8. pipeline-512                     the 50-step pipeline s/image at 512 px, the paper's figures beside
  9. context-parallel                 `agentsd bench --context-parallel` over 2-4 GPUs (Wan 2.1 1.3B, 480p,
                                      81 frames, Ulysses and ring); skipped, saying so, with fewer than 2 GPUs
The diffusion transformers follow SDXL after the short CUDA tests and break-even grids: those
take about two minutes together, and they are what a first GPU run must bring back (whether the
kernels are right on CUDA, and the `min_tokens` per device), while the transformers' builds and
steps are the largest items of the list.
Not in the default order (run them with --scenarios): sd21-768, pipeline-1024.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import breakeven, estimate, full_generation, gpu_tests, multi_gpu, step
from .budget import Cost
from .common import Outcome, PartContext
from .step import StepPlan


@dataclass(frozen=True)
class Scenario:
    """One piece of the suite.

    Args:
        name: what --scenarios calls it.
        part: the folder its files go to.
        about: what it measures, in a few words.
        cost: its prior units (`budget.Cost`), given --tiny and the architecture the model cache holds.
        run: runs it and writes its part's files.
        model: the architecture it leaves in the model cache, given --tiny (None: none).
        memory: its peak memory in bytes given --tiny, where it states one (`estimate.py`): the
            run skips it, saying so, on a device with less.
        unavailable: why it cannot run on this machine ("" where it can), where it needs more than
            one device: the run skips it, saying why.
    """

    name: str
    part: str
    about: str
    cost: Callable[[bool, str | None], Cost]
    run: Callable[[PartContext], Outcome]
    model: Callable[[bool], str | None] = lambda tiny: None
    memory: Callable[[bool], float] | None = None
    unavailable: Callable[[PartContext], str] | None = None


def _step(name: str, part: str, about: str, plan: StepPlan) -> Scenario:
    return Scenario(
        name,
        part,
        about,
        cost=lambda tiny, built: estimate.step_cost(plan, tiny, built),
        run=lambda context: step.run_scenario(part, plan, context),
        model=lambda tiny: step.TINY_ARCHS[plan.arch] if tiny else plan.arch,
    )


def _tests(name: str, selection: str, about: str) -> Scenario:
    return Scenario(name, name, about, cost=lambda tiny, built: estimate.tests_cost(selection, tiny),
                    run=lambda context: gpu_tests.run_selection(name, selection, context))  # fmt: skip


def _breakeven(batch: int) -> Scenario:
    about = f"one SD 1.5 layer against SDPA, grids 8x8 to 128x128, CFG batch {batch}"
    return Scenario(f"breakeven-{batch}", "breakeven", about, cost=lambda tiny, built: estimate.breakeven_cost(tiny),
                    run=lambda context: breakeven.run_batch(batch, context))  # fmt: skip


def _pipeline(size: int) -> Scenario:
    about = f"a 50-step DDIM SD 1.5 generation at {size} px, s/image and GB/image, 5 methods"
    return Scenario(f"pipeline-{size}", "pipeline", about, cost=lambda tiny, built: estimate.pipeline_cost(size, tiny),
                    run=lambda context: full_generation.run_size(size, context))  # fmt: skip


def _sd15(size: int) -> Scenario:
    plan = StepPlan("sd15", (size,), (1,), step.SD15_METHODS)
    return _step(f"sd15-{size}", "sd15", f"SD 1.5 fp16 step at {size} px: agentsd, tomesd, ceiling", plan)


def _sdxl(size: int) -> Scenario:
    plan = StepPlan("sdxl", (size,), (1,), step.SDXL_METHODS)
    return _step(f"sdxl-{size}", "sdxl", f"SDXL fp16 step at {size} px, `sdxl` preset", plan)


def _sd35(size: int) -> Scenario:
    plan = StepPlan("sd35-medium", (size,), (1,), step.SD35_METHODS)
    about = f"SD 3.5 Medium transformer fp16 step at {size} px, `sd3` preset: agentsd, ceiling"
    return _step(f"sd35-{size}", "sd35", about, plan)


def _flux(size: int) -> Scenario:
    plan = StepPlan("flux-dev", (size,), (1,), step.FLUX_METHODS, cuda_dtype=torch.bfloat16)
    about = f"Flux.1-dev transformer bf16 step at {size} px, `flux` preset: agentsd, ceiling"
    return _step(f"flux-{size}", "flux", about, plan)


def _stack(size: int) -> Scenario:
    plan = StepPlan("flux-dev", (size,), (1,), (), cuda_dtype=torch.bfloat16, cache=step.STACK_CACHE)
    about = (f"Flux.1-dev transformer bf16 at {size} px, {step.STACK_CACHE} (FirstBlockCache) alone and with agentsd, "
             "per computed and skipped step")  # fmt: skip
    return _step(f"stack-flux-{size}", "flux-stack", about, plan)


def _wan(name: str, size: tuple[int, int], frames: int) -> Scenario:
    plan = StepPlan("wan2.1-1.3b", (size,), (1,), step.WAN_METHODS, cuda_dtype=torch.bfloat16, frames=(frames,))
    about = (f"Wan 2.1 1.3B transformer bf16, one of a step's 2 calls, {frames} frames at {size[0]}x{size[1]}, "
             "`wan` preset: agentsd, ceiling-products, on the dispatcher's default backend")  # fmt: skip

    def run(context: PartContext) -> Outcome:
        outcome = step.run_scenario("wan", plan, context)
        outcome.headline += f"; attention on the dispatcher's {step.dispatcher_backend()} backend"
        return outcome

    return replace(_step(name, "wan", about, plan), run=run, memory=lambda tiny: estimate.video_step_memory(plan, tiny))


def _context_parallel() -> Scenario:
    about = (f"agentsd bench --context-parallel over 2-4 GPUs: {multi_gpu.ARCH} bf16, {multi_gpu.FRAMES} frames at "
             f"{multi_gpu.SIZE}, Ulysses and ring: time and elements sent")  # fmt: skip
    return Scenario("context-parallel", multi_gpu.PART, about, cost=multi_gpu.cost, run=multi_gpu.run,
                    unavailable=multi_gpu.unavailable)  # fmt: skip


COMPILED_AGENT = StepPlan("sd15", (1024,), (1,), ("baseline", "agentsd-agent", "ceiling"),
                          compiled=("baseline", "agentsd-agent"))  # fmt: skip
COMPILED_CEILING = StepPlan("sd15", (1024,), (1,), ("baseline", "ceiling"), compiled=("baseline", "ceiling"))

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        _sd15(512),
        _sd15(1024),
        _sd15(2048),
        _sdxl(1024),
        _sdxl(2048),
        _sd35(1024),
        _sd35(2048),
        _flux(1024),
        _flux(2048),
        _stack(1024),
        _wan("wan-480p", (480, 832), 81),
        _tests("tests", "short", "the short CUDA tests: fp16/bf16 patch cycles, identical calls, host syncs"),
        _breakeven(2),
        _breakeven(8),
        _step(
            "highres-2048",
            "sd15-highres",
            "`highres` and the two-level ceiling at 2048 px",
            StepPlan("sd15", (2048,), (1,), step.HIGHRES_METHODS),
        ),  # fmt: skip
        _step(
            "compile-agent-1024",
            "sd15-compile",
            "baseline and agent phase compiled (inductor), 1024 px",
            COMPILED_AGENT,
        ),  # fmt: skip
        _step(
            "compile-ceiling-1024",
            "sd15-compile-ceiling",
            "baseline and ceiling compiled (inductor), 1024 px",
            COMPILED_CEILING,
        ),  # fmt: skip
        _tests("tests-compile", "compile", "the inductor CUDA test: a compiled patched UNet, no recompiles"),
        _pipeline(512),
        _pipeline(1024),
        _context_parallel(),
        _step(
            "sd21-768",
            "sd21",
            "SD 2.1 fp16 step at 768 px, `sd21` preset",
            StepPlan("sd21", (768,), (1,), step.SDXL_METHODS),
        ),  # fmt: skip
    )
}
DEFAULT_ORDER = ("sd15-512", "sd15-1024", "sd15-2048", "sdxl-1024", "sdxl-2048", "tests", "breakeven-2",
                 "breakeven-8", "sd35-1024", "sd35-2048", "flux-1024", "flux-2048", "stack-flux-1024", "wan-480p",
                 "highres-2048", "compile-agent-1024", "compile-ceiling-1024", "tests-compile", "pipeline-512",
                 "context-parallel")  # fmt: skip
