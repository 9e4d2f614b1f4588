"""The one-step scenarios: `agentsd bench` runs (`benchmark.run_benchmark`) on the real UNets
and diffusion transformers.

Each scenario is one architecture at one image size (`StepPlan`; a video's height x width and
frame count), so the budget can stop between sizes. Its rows join those of its part (`sd15`,
`sdxl`, `sd35`, `flux`, `wan`, `sd15-highres`, `sd15-compile`, `sd15-compile-ceiling`, `sd21`),
whose files are rewritten after every scenario. The model is built once per architecture and
kept between scenarios (`ModelCache`): one model at a time, so the peak memory of a scenario
holds its own weights only. A plan may name its dtype on CUDA (Flux.1-dev and Wan run in bf16,
as their pipelines do); on the CPU (--tiny) every model runs in fp32.

A compiled scenario times its methods eager and under torch.compile (inductor), one
compilation per compiled method; the compiled agent phase's share of the compiled ceiling's
speedup combines `sd15-compile` and `sd15-compile-ceiling` (each against its own compiled
baseline), two scenarios so that the budget can run one without the other.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..bench import benchmark
from ..bench.transformer_models import Size, sides
from .common import Outcome, PartContext
from .flops import call_flops

logger = logging.getLogger(__name__)

SD15_METHODS = ("baseline", "agentsd-agent", "agentsd-tome", "tomesd", "ceiling")
SDXL_METHODS = ("baseline", "agentsd-agent", "agentsd-tome", "tomesd", "ceiling")
SD35_METHODS = ("baseline", "agentsd-agent", "agentsd-tome", "ceiling")  # tomesd patches UNets only
FLUX_METHODS = ("baseline", "agentsd-agent", "agentsd-tome", "ceiling")
# Wan: the bound of the attention products (projections kept) instead of the whole-layer ceiling,
# what the video targets are read against.
WAN_METHODS = ("baseline", "agentsd-agent", "agentsd-tome", "ceiling-products")
HIGHRES_METHODS = ("baseline", "highres", "ceiling-2")
STACK_CACHE = "first-block:0.05"  # the stacked scenario's cache: diffusers' FirstBlockCache at its default
REPEATS, WARMUP = 10, 2  # per method and scenario on the GPU
# The tiny stand-ins (agentsd.testing, benchmark's tiny-*) of each architecture; in --tiny mode an
# image side is divided by TINY_DIVISOR (2048 px -> 256 px: a 32x32 latent on the tiny UNet), a
# transformer's by 4: its 2x2 patches halve the grid, and at 1024 px / 4 it is 16x16 = 256
# tokens, where the `sd3` and `flux` presets start to act. A video's height and width are divided
# by 4 too, down to whole tokens (480x832 -> 112x208: 7x13 tokens a frame), its frames kept (81:
# 21 x 7 x 13 = 1,911 tokens).
TINY_ARCHS = {"sd15": "tiny", "sd21": "tiny-sd2", "sdxl": "tiny-sdxl", "sd35-medium": "tiny-sd35",
              "flux-dev": "tiny-flux", "wan2.1-1.3b": "tiny-wan"}  # fmt: skip
TINY_DIVISOR = 8
TINY_TRANSFORMER_DIVISOR = 4


@dataclass(frozen=True)
class StepPlan:
    """One `run_benchmark` call: an architecture's scenario and the methods timed.

    Args:
        arch: `sd15`, `sd21`, `sdxl`, `sd35-medium`, `flux-dev` or `wan2.1-1.3b` (whole models).
        sizes, batches: image sides (a video's (height, width)) and images per prompt (every
            combination is timed).
        methods: the methods to time (those that cannot run here are left out).
        preset: the agentsd preset; None: the architecture's default (`paper`, `sd21`, `sdxl`,
            `sd3`, `flux`).
        compiled: the methods also timed under torch.compile.
        cuda_dtype: the dtype on CUDA; None: the suite's (fp16). The CPU runs fp32 whatever it says.
        frames: a video's frame counts (4 k + 1), each timed at every size; () for images.
        cache: a step cache (`first-block:0.05`): time it alone and with agentsd, beside the
            baseline and agentsd alone, per computed and skipped step (`bench/stack.py`), instead
            of the methods.
    """

    arch: str
    sizes: tuple[Size, ...]
    batches: tuple[int, ...]
    methods: tuple[str, ...]
    preset: str | None = None
    compiled: tuple[str, ...] = ()
    cuda_dtype: torch.dtype | None = None
    frames: tuple[int, ...] = ()
    cache: str | None = None

    def dtype(self, context: PartContext) -> torch.dtype:
        """The dtype the plan runs in on the context's device."""
        return self.cuda_dtype if self.cuda_dtype is not None and context.device.type == "cuda" else context.dtype


def tiny_plan(plan: StepPlan) -> StepPlan:
    """The plan on the tiny stand-in of its architecture, at sides divided by `TINY_DIVISOR`
    (a transformer's by `TINY_TRANSFORMER_DIVISOR`; a video's down to whole 16 px tokens)."""
    if benchmark.is_video(plan.arch):
        sizes = tuple(tuple(max(64, side // TINY_TRANSFORMER_DIVISOR // 16 * 16) for side in sides(size))
                      for size in plan.sizes)  # fmt: skip
        return replace(plan, arch=TINY_ARCHS[plan.arch], sizes=sizes)
    divisor = TINY_TRANSFORMER_DIVISOR if benchmark.is_transformer(plan.arch) else TINY_DIVISOR
    sizes = tuple(max(64, size // divisor) for size in plan.sizes)
    return replace(plan, arch=TINY_ARCHS[plan.arch], sizes=sizes)


def row_size(row: dict[str, Any]) -> Size:
    """The size of a row's scenario as `run_benchmark` took it: a side, or a video's (height, width)."""
    return row["size"] if row.get("frames") is None else (row["size"], row["width"])


def rounds(tiny: bool) -> tuple[int, int]:
    """(repeats, warm-up rounds) per method: one repeat and no warm-up in --tiny mode."""
    return (1, 0) if tiny else (REPEATS, WARMUP)


class ModelCache:
    """The model (UNet or transformer) of one architecture at a time, built on first use and kept
    for the next scenario of the same architecture and dtype (another one drops the old model
    first).

    Args:
        device, dtype: where the models are built and their default dtype.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.arch: str | None = None
        self.model: Any = None
        self.model_dtype: torch.dtype | None = None
        self.builds: list[tuple[str, float]] = []  # (architecture, seconds) of every build

    def get(self, arch: str, dtype: torch.dtype | None = None) -> Any:
        dtype = dtype or self.dtype
        if arch != self.arch or dtype != self.model_dtype:
            self.model, self.arch = None, None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            start = time.perf_counter()
            self.model = benchmark.build_model(arch, self.device, dtype)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.builds.append((arch, time.perf_counter() - start))
            self.arch, self.model_dtype = arch, dtype
            logger.info("built the %s model (%s) in %.1f s", arch, str(dtype).replace("torch.", ""),
                        self.builds[-1][1])  # fmt: skip
        return self.model


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


def dispatcher_backend() -> str:
    """The backend diffusers' attention dispatcher runs when a model names none (`native`: torch's
    SDPA, unless `DIFFUSERS_ATTN_BACKEND` says otherwise): the baseline's of the models whose
    processors call the dispatcher (Flux, Wan), and agentsd's there."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        name = _AttentionBackendRegistry.get_active_backend()[0]
    except (ImportError, AttributeError):  # a diffusers without the dispatcher, or with another registry
        return "unknown"
    return str(getattr(name, "value", name))


def runnable(methods: tuple[str, ...], context: PartContext) -> list[str]:
    """`methods` without those that cannot run here (xformers off CUDA, not installed or not
    working; tomesd not installed)."""
    available = set(benchmark.available_methods(context.device)) | set(benchmark.OPTIONAL_METHODS)
    if "xformers" in available and "xformers" in methods and not xformers_runs(context.device):
        available.remove("xformers")
    left_out = [m for m in methods if m not in available]
    if left_out:
        logger.warning("left out (cannot run here): %s", ", ".join(left_out))
    return [m for m in methods if m in available]


def headline(rows: list[dict[str, Any]]) -> tuple[float | None, str]:
    """(baseline ms, the other methods' speedups) of one scenario's rows."""
    base = next((r["median_ms"] for r in rows if r["method"] == "baseline"), None)
    speedups = ", ".join(f"{r['method']} {r['speedup']:.2f}x" for r in rows if r["method"] != "baseline")
    return base, speedups or "no rows (out of memory? see suite.log)"


def run_scenario(part: str, plan: StepPlan, context: PartContext) -> Outcome:
    """Time the plan, add its rows to the part's and rewrite the part's files
    (`benchmark.write_results`); the baseline's time per FLOP calibrates the budget."""

    run = tiny_plan(plan) if context.tiny else plan
    if run.cache is not None:
        return _run_stack(part, plan, run, context)
    rows = context.rows.setdefault(part, [])
    new: list[dict[str, Any]] = []
    folder = context.folder(part)

    def save(scenario_rows: list[dict[str, Any]]) -> None:
        rows.extend(scenario_rows)
        new.extend(scenario_rows)
        benchmark.write_results(rows, folder, context.command)

    builds_before = len(context.models.builds)
    repeats, warmup = rounds(context.tiny)
    dtype = plan.dtype(context)
    benchmark.run_benchmark(
        archs=[run.arch],
        sizes=run.sizes,
        batches=run.batches,
        methods=runnable(run.methods, context),
        preset=run.preset,
        repeats=repeats,
        warmup=warmup,
        device=context.device,
        dtype=dtype,
        # Dynamo's eager backend in --tiny mode: the harness is checked, not inductor.
        compile=("eager" if context.tiny else "inductor") if run.compiled else None,
        compile_methods=list(run.compiled),
        progress=False,
        on_rows=save,
        build=lambda arch: context.models.get(arch, dtype),
        frames=run.frames or None,
    )
    if not new:  # the scenario ran out of memory: the part's files are still written
        benchmark.write_results(rows, folder, context.command)
    baseline_ms, speedups = headline(new)
    return Outcome(headline=speedups, baseline_ms=baseline_ms, measured=_rates(plan, run, new, context, builds_before))


def _rates(plan: StepPlan, run: StepPlan, new: list[dict[str, Any]], context: PartContext, builds_before: int):
    """The seconds per unit a scenario measured: its model's build, and the baseline's per FLOP.
    Keyed by the real architecture, also for its tiny stand-in."""
    measured = {f"build:{plan.arch}": seconds for _, seconds in context.models.builds[builds_before:]}
    base = next((r for r in new if r["method"] == "baseline"), None)
    if base is not None:
        flops = call_flops(run.arch, row_size(base), base["batch"], "baseline", run.preset, base.get("frames"))
        measured["flop"] = base["median_ms"] / 1000 / flops
    return measured


def _run_stack(part: str, plan: StepPlan, run: StepPlan, context: PartContext) -> Outcome:
    """A stacked scenario (`run.cache`): the cache alone and with agentsd per computed and skipped
    step (`stack.run_stack_benchmark`, the code of `agentsd bench --cache`), its rows added to the
    part's and the part's files rewritten; the headline reads the two stack targets. `run` is
    `plan` as run here (its tiny stand-in in --tiny mode)."""
    from ..api.caches import parse_cache
    from ..bench import stack, stack_report

    rows = context.rows.setdefault(part, [])
    new: list[dict[str, Any]] = []

    def save(scenario_rows: list[dict[str, Any]]) -> None:
        rows.extend(scenario_rows)
        new.extend(scenario_rows)
        stack_report.write_stack_results(rows, context.folder(part), context.command)

    builds_before = len(context.models.builds)
    repeats, warmup = rounds(context.tiny)
    dtype = plan.dtype(context)
    stack.run_stack_benchmark([run.arch], parse_cache(run.cache), run.sizes, run.batches, preset=run.preset,
                              repeats=repeats, warmup=warmup, device=context.device, dtype=dtype,
                              frames=run.frames or None, on_rows=save,
                              build=lambda arch: context.models.get(arch, dtype))  # fmt: skip
    judged = [c.text.split(": ", 1)[1] for c in stack_report.stack_checks(new) if c.name != "mix"]
    baseline_ms = next((r["median_ms"] for r in new if r["method"] == "baseline"), None)
    return Outcome(headline="; ".join(judged) or "no rows (see suite.log)", baseline_ms=baseline_ms,
                   measured=_rates(plan, run, new, context, builds_before))  # fmt: skip
