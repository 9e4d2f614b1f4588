"""How long each part of the GPU suite takes on one H100, estimated from FLOPs.

The FLOPs of every timed call are counted by `torch.utils.flop_counter.FlopCounterMode`
on the meta device (no memory, no weights, seconds on any CPU): the UNet call of every
scenario and method of the one-step parts, the UNet steps, VAE decode and text encoder of
every generation of the pipeline part. Time = FLOPs / `THROUGHPUT` + calls x
`CALL_OVERHEAD` + fixed costs (building the models, compiling). The breakeven part's time
is set by its timing budget, the tests part's by its compilations; both are stated as such.
Methods that cannot run on the meta device (tomesd, xformers) are counted as the baseline,
an upper bound for them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import benchmark
from ..presets import load_preset
from . import breakeven, pipeline, unet

# An effective fp16 rate well under the H100's dense peak (~990 TFLOP/s): eager SD UNets
# reach a fraction of it (small kernels, head dims of 40-64).
THROUGHPUT = 100e12
CALL_OVERHEAD = 0.02  # s per UNet call: ~1,500 eager kernel launches
BUILD_S = {"sd15": 20.0, "sd21": 20.0, "sdxl": 60.0, "pipeline": 40.0}  # random init of the weights
COMPILE_S = 150.0  # one inductor compilation of a whole UNet
START_S = 20.0  # python, torch, diffusers imports and CUDA start-up, per part
META_COUNTED = ("baseline", "agentsd-agent", "agentsd-tome", "highres", "ceiling", "ceiling-2")
# The tests part: pytest start-up and collection, the inductor compilation of a tiny UNet in
# each of the two phases, and the other tests (tiny pipelines, seconds each).
TESTS_S = 30.0 + 2 * 90.0 + 60.0
LIMIT_S = 480.0  # each part must end within 8 minutes


def unet_call_flops(model: Any, size: int, images: int, method: str, config: Any) -> float:
    """FLOPs of one UNet call of `images` CFG images of `size` px as `method`, on the meta device."""
    args, kwargs = benchmark.unet_inputs(model, size, images)
    args = (args[0], torch.tensor(500))  # a CPU timestep: the agentsd hook reads its value
    counted = method if method in META_COUNTED else "baseline"
    with torch.no_grad(), benchmark.method_context(counted, model, config), FlopCounterMode(display=False) as flops:
        model(*args, **kwargs)
    return float(flops.get_total_flops())


def unet_part(part: str) -> dict[str, Any]:
    """FLOPs, calls and seconds of a one-step part."""
    total_flops, calls, fixed = 0.0, 0, START_S
    for plan in unet.PLANS[part]:
        model = benchmark.build_unet(plan.arch, "meta", torch.float16)
        config = load_preset(plan.preset or benchmark.DEFAULT_PRESETS[plan.arch])
        fixed += BUILD_S[plan.arch] + COMPILE_S * len(plan.compiled)
        rounds = unet.REPEATS + unet.WARMUP
        for size in plan.sizes:
            for images in plan.batches:
                for method in (*plan.methods, *plan.compiled):
                    total_flops += rounds * unet_call_flops(model, size, images, method, config)
                    calls += rounds
    return _summary(part, total_flops, calls, fixed)


def pipeline_part() -> dict[str, Any]:
    """FLOPs, calls and seconds of the pipeline part, every method counted as the baseline."""
    pipe = pipeline.sd15_pipeline("meta", torch.float16)
    config = load_preset("paper")
    methods = len(pipeline.METHODS)
    total_flops, calls = 0.0, 0
    with torch.no_grad():
        with FlopCounterMode(display=False) as text:
            pipe.text_encoder(torch.zeros(2, 77, dtype=torch.long, device="meta"))
        for plan in pipeline.PLANS:
            step = unet_call_flops(pipe.unet, plan.size, 1, "baseline", config)
            latent = torch.empty(1, 4, plan.size // 8, plan.size // 8, device="meta", dtype=torch.float16)
            with FlopCounterMode(display=False) as vae:
                pipe.vae.decode(latent)
            image = plan.steps * step + vae.get_total_flops() + text.get_total_flops()
            # Per method: a 1-step warm-up, the timed images, then 2-step generations of 1 and
            # 2 images for the memory per image.
            warmup_and_memory = (step + vae.get_total_flops()) + 3 * (2 * step + vae.get_total_flops())
            total_flops += methods * (plan.images * image + warmup_and_memory)
            calls += methods * (plan.images * plan.steps + 1 + 3 * 2)
    return _summary("pipeline", total_flops, calls, START_S + BUILD_S["pipeline"])


def breakeven_part() -> dict[str, Any]:
    """Seconds of the breakeven part: its timing budget per measurement, plus one warm-up
    block each (its FLOPs are negligible)."""
    plan = breakeven.PLAN
    timings = len(plan.grids) * len(plan.batches) * (1 + len(breakeven.PHASES))
    return dict(part="breakeven", tflop=None, calls=None, seconds=round(START_S + timings * 1.5 * plan.min_run_time))


def _summary(part: str, flops: float, calls: int, fixed: float) -> dict[str, Any]:
    seconds = flops / THROUGHPUT + calls * CALL_OVERHEAD + fixed
    return dict(part=part, tflop=round(flops / 1e12, 1), calls=calls, seconds=round(seconds))


def estimates() -> list[dict[str, Any]]:
    """Every part's estimate: part, TFLOP timed, UNet calls, seconds (upper-bound assumptions)."""
    rows = [dict(part="tests", tflop=None, calls=None, seconds=round(TESTS_S))]
    rows += [unet_part(part) for part in unet.PLANS]
    return rows + [pipeline_part(), breakeven_part()]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The estimates as a Markdown table, with the 8-minute limit checked."""
    lines = ["| part | TFLOP timed | UNet calls | estimated s on one H100 | within 8 min |", "|---|---|---|---|---|"]
    for row in rows:
        tflop = "" if row["tflop"] is None else f"{row['tflop']:,.0f}"
        calls = "" if row["calls"] is None else str(row["calls"])
        fits = "yes" if row["seconds"] <= LIMIT_S else "NO"
        lines.append(f"| {row['part']} | {tflop} | {calls} | {row['seconds']} | {fits} |")
    return "\n".join(lines) + "\n"
