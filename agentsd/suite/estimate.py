"""What each scenario of the GPU suite costs, in units the budget turns into seconds (`budget.py`).

The FLOPs of every timed call are counted on the meta device (`flops.py`): the model call (UNet
or transformer) of every method of a one-step scenario, the UNet steps, VAE decode and text
encoder of every generation of a pipeline scenario. Builds, compilations, the breakeven timings
and the pytest subprocesses are counted as such. A video scenario also states its peak memory
(`video_step_memory`), which the run checks against the device's before it starts it.

`PRIORS` are the seconds per unit on one H100 before anything is measured, deliberately
pessimistic; `TINY_PRIORS` the same for --tiny on a CPU. A run replaces them by what it
measures. `--estimate` prints every scenario's prior estimate against the budget
(`estimate_table.py`).
"""

from __future__ import annotations

import functools
import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..api.caches import parse_cache
from ..bench import wan_models
from ..bench.stack import calls_per_round
from ..bench.transformer_models import sides
from . import breakeven, full_generation, gpu_tests, step
from .budget import Cost
from .flops import call_flops, meta_model

# An effective fp16 rate well under the H100's dense peak (~990 TFLOP/s): eager SD UNets
# reach a fraction of it (small kernels, head dims of 40-64).
THROUGHPUT = 100e12
CALL_OVERHEAD = 0.02  # s per UNet call: ~1,500 eager kernel launches
# Random init of the weights (SD 3.5 Medium's 2.5 B parameters as SDXL's 2.6 B; Flux.1-dev's
# 12 B drawn in fp32, 48 GB, then cast to bf16).
BUILD_S = {"sd15": 20.0, "sd21": 20.0, "sdxl": 60.0, "sd35-medium": 60.0, "flux-dev": 120.0, "wan2.1-1.3b": 20.0,
           "pipeline": 40.0}  # fmt: skip
COMPILE_S = 150.0  # one inductor compilation of a whole UNet
TIMING_S = 1.5  # one breakeven timing: its budget of calls (`min_run_time`) x 1.5, for the warm-up block
PRIORS: dict[str, float] = dict(flop=1 / THROUGHPUT, call=CALL_OVERHEAD, compile=COMPILE_S, seconds=1.0,
                                timing=TIMING_S * breakeven.PLAN.min_run_time,
                                **{f"build:{arch}": s for arch, s in BUILD_S.items()})  # fmt: skip
# --tiny on a CPU: tiny models, one repeat, Dynamo's eager backend (seconds to "compile").
TINY_PRIORS: dict[str, float] = dict(flop=1 / 1e9, call=0.05, compile=5.0, seconds=1.0, timing=0.2,
                                     **{f"build:{arch}": 1.0 for arch in BUILD_S})  # fmt: skip


def priors(tiny: bool) -> dict[str, float]:
    return dict(TINY_PRIORS if tiny else PRIORS)


def step_cost(plan: step.StepPlan, tiny: bool, built: str | None = None) -> Cost:
    """A one-step scenario: every method's calls (warm-up and repeats), the build of its model
    unless `built` (the model cache's architecture) is it already, and its compilations."""
    run = step.tiny_plan(plan) if tiny else plan
    repeats, warmup = step.rounds(tiny)
    # A stacked scenario (`plan.cache`) makes `stack.calls_per_round` calls a round, each counted
    # at the baseline's FLOPs (pessimistic: skipped and agentsd calls cost less).
    methods = ("baseline",) * calls_per_round(parse_cache(run.cache)) if run.cache else run.methods
    flops, calls = 0.0, 0
    for size in run.sizes:
        for frames in run.frames or (None,):
            for images in run.batches:
                for method in methods:
                    flops += (repeats + warmup) * call_flops(run.arch, size, images, method, run.preset, frames)
                    calls += repeats + warmup
                for method in run.compiled:
                    counted = call_flops(run.arch, size, images, method, run.preset, frames)
                    flops += (repeats + max(warmup, 1)) * counted
                    calls += repeats + max(warmup, 1)
    cost = dict(flop=flops, call=float(calls))
    if built != run.arch:
        cost[f"build:{plan.arch}"] = 1.0
    if run.compiled:
        cost["compile"] = float(len(run.compiled))
    return cost


def video_step_memory(plan: step.StepPlan, tiny: bool) -> float:
    """Peak bytes of a video one-step scenario (a Wan transformer), pessimistic: the larger of the
    model drawn in fp32 before its cast (4 bytes a parameter), and its weights in the plan's dtype
    with one block's activations of the largest call: per token a dozen model widths (hidden
    states, their normalized copy, queries, keys, values, attention output, residuals) and three
    feed-forward widths, in that dtype, and on Wan 2.2 the per-token timestep embeddings (six
    widths, in fp32, twice). The parameters are counted on the meta device."""
    run = step.tiny_plan(plan) if tiny else plan
    model = meta_model(run.arch)
    config = model.config
    size = 4 if tiny else (plan.cuda_dtype or torch.float16).itemsize  # the CPU (--tiny) runs fp32
    parameters = sum(p.numel() for p in model.parameters())
    width = config.num_attention_heads * config.attention_head_dim
    grids = [wan_models.token_grid(config, *sides(s), f) for s in run.sizes for f in run.frames or (81,)]
    tokens = max(f * h * w for f, h, w in grids) * max(run.batches)
    per_token = size * (12 * width + 3 * config.ffn_dim)
    if wan_models.is_wan22(config):
        per_token += 2 * 4 * 6 * width
    return float(max(4 * parameters, size * parameters + tokens * per_token))


def device_memory(device: torch.device) -> float:
    """Bytes of memory on `device`: the GPU's total, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@functools.cache
def _pipeline_fixed_flops(size: int) -> tuple[float, float]:
    """(text encoder, VAE decode) FLOPs of one 1-image generation at `size` px."""
    pipe = full_generation.sd15_pipeline("meta", torch.float16)
    with torch.no_grad():
        with FlopCounterMode(display=False) as text:
            pipe.text_encoder(torch.zeros(2, 77, dtype=torch.long, device="meta"))
        latent = torch.empty(1, 4, size // 8, size // 8, device="meta", dtype=torch.float16)
        with FlopCounterMode(display=False) as vae:
            pipe.vae.decode(latent)
    return float(text.get_total_flops()), float(vae.get_total_flops())


def pipeline_cost(size: int, tiny: bool) -> Cost:
    """A pipeline scenario, every method counted as the baseline: per method a 1-step warm-up,
    the timed images, then 2-step generations of 1 and 2 images for the memory per image. In
    --tiny mode the calls alone (the tiny pipeline's FLOPs are nothing)."""
    plan = full_generation.plan(size, tiny)
    methods = len(full_generation.METHODS)
    calls = methods * (plan.images * plan.steps + 1 + 3 * 2)
    if tiny:
        return {"call": float(calls), "build:pipeline": 1.0}
    step = call_flops("sd15", plan.size, 1, "baseline")
    text, vae = _pipeline_fixed_flops(plan.size)
    image = plan.steps * step + vae + text
    warmup_and_memory = (step + vae) + 3 * (2 * step + vae)
    flops = methods * (plan.images * image + warmup_and_memory)
    return {"flop": flops, "call": float(calls), "build:pipeline": 1.0}


def breakeven_cost(tiny: bool) -> Cost:
    """A breakeven scenario (one batch): one baseline and one timing per phase, per grid."""
    plan = breakeven.plan(tiny)
    return {"timing": float(len(plan.grids) * (1 + len(breakeven.PHASES)))}


def tests_cost(selection: str, tiny: bool) -> Cost:
    """A tests scenario: its pytest subprocess, as fixed seconds."""
    return {"seconds": gpu_tests.TINY_SECONDS if tiny else gpu_tests.SELECTIONS[selection].seconds}
