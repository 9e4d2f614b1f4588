"""`agentsd bench --cache`: a step cache alone and stacked with agentsd, beside the baseline and
agentsd alone, per computed step and per skipped step.

A step cache decides from the model's outputs which calls to skip, and random weights make that
decision meaningless, so the bench does not time a generation: it times the two kinds of call
apart and leaves the mix to the user's model. Each round runs, interleaved, the cache alone
then the baseline, the cache with agentsd (the preset's agent phase) then agentsd alone
(`STACK_METHODS`): the cache switched on afresh (`api.caches.enabled_cache`), one untimed call
that fills it (two for FasterCache), timed calls in one cache context until the cache has both
computed and skipped a call (`CHUNK_CALLS` at most), then the cache off and one timed call
without it, so that agentsd's call alone is, as the stack's, not the first after its patch. The
inputs repeat and change in turns (A, B, B, A, ...), so a cache that compares outputs
(FirstBlockCache) skips a repeated call and computes a changed one, paying its own check;
interval caches (TaylorSeer, Pyramid Attention Broadcast) alternate by themselves. Each timed
call is classified by `counting_skips`: computed when every patched layer ran, skipped
otherwise. A step at skip fraction f then takes (1 - f) x computed + f x skipped
(`stack_rows`); the user's model tells f, `agentsd compare --cache` records it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..api.caches import CACHES, CacheSpec, counting_skips, enabled_cache, family_reason
from ..core.config import AgentSDConfig
from .benchmark import _record, default_sizes, is_video, model_inputs, split_arch
from .methods import method_context
from .results import FIELDS, _percentile, run_info
from .timing import timed_call
from .transformer_models import ALL_TRANSFORMERS, Size, sides
from .wan_models import DEFAULT_FRAMES

AGENT = "agentsd-agent"  # agentsd's method in the stack: the preset's agent phase
STACK_METHODS = ("baseline", AGENT, "cache", "cache+agentsd")
KINDS = ("computed", "skipped")
CHUNK_CALLS = 6  # timed calls per method and round at most, waiting for the cache to do both kinds
# What caches keyed on the pipeline's timestep read (Pyramid Attention Broadcast, FasterCache): the
# calls that fill the cache at the first step's (outside their default ranges: they compute), the timed
# ones inside the ranges. FasterCache approximates from two computed calls: it takes two to fill.
FILL_TIMESTEP, CURRENT_TIMESTEP = 999.0, 500.0
FILL_CALLS = {"faster": 2}
DEFAULT_SKIP_FRACTIONS = (0.5,)
STEPS = 50  # the run length a cache that needs one (MagCache) is configured for
# The CPU target: a computed step of the stack at least this fast as agentsd's alone (the cache adds
# nothing to agentsd's step); the GPU target: the stack over the cache alone per computed step at
# least this share of agentsd's own speedup over the baseline.
COMPUTED_TARGET = 0.95
SHARE_TARGET = 0.9
STACK_FIELDS = (*(f for f in FIELDS if f not in ("ceiling_fraction", "saved_fraction")), "cache", "step",
                "skip_fraction", "over_cache")  # fmt: skip
# cache: the cache's label (`first-block:0.05`); step: `computed` or `skipped` for the cache rows,
# `every` for the baseline and agentsd rows (no cache: every call computes), `mix` for the rows
# derived at `skip_fraction`; over_cache: a cache+agentsd row's speed over the cache row of its step.
NOTE = (
    "The skip fraction is your model's: a cache decides from the model's outputs what to skip, and "
    "random weights decide nothing, so the bench times a computed and a skipped step apart and reads "
    "a step at skip fraction f as (1 - f) x computed + f x skipped. `agentsd compare --cache {label}` "
    "records the fraction of a real run."
)


def cache_problem(arch: str, spec: CacheSpec) -> str:
    """Why the bench cannot time `spec` on `arch` (`NAME` or `NAME:K`), or "" where it can: the
    diffusers caches run on the families `CACHES` lists; cache-dit's need a pipeline."""
    cache = spec.cache
    if cache.library == "cache-dit":
        theirs = ", ".join(name for name, other in CACHES.items() if other.library == "diffusers")
        return (f"{spec.name} is cache-dit's, which is switched on through a pipeline (cache_dit.enable_cache(pipe)), "
                "and the bench builds a bare transformer: time it in a real run with `agentsd compare --cache "
                f"{spec.label}`, or use one of {theirs}")  # fmt: skip
    name, blocks = split_arch(arch)
    spec_of = ALL_TRANSFORMERS.get(name)
    family = spec_of.family if spec_of else "unet"
    why = family_reason(cache, family)
    if why is not None:
        return f"{spec.name} does not run on {name} ({family}): {why}"
    if spec.name == "first-block" and blocks == 1 and family != "flux":  # Flux's 1 is 1 + 2 blocks
        return f"FirstBlockCache runs the first block and caches the others: build {name} with --blocks 2 or more"
    return ""


def calls_per_round(spec: CacheSpec) -> int:
    """Model calls of one round of `time_stack` for a cache that computes and skips in turn
    (FirstBlockCache, TaylorSeer after its first calls): the baseline's and agentsd's, then per
    cache method its filling calls and two timed ones (`CHUNK_CALLS` at most otherwise)."""
    return 2 + 2 * (FILL_CALLS.get(spec.name, 1) + 2)


def _inputs_in_turn(inputs: tuple[tuple, dict[str, Any]]) -> list[tuple[tuple, dict[str, Any]]]:
    """The inputs A and B (another latent, the rest the same), in the order A, B, B, A, A, B, ...:
    after the untimed A that fills the cache, every other call repeats the one before."""
    args, kwargs = inputs
    other = (args, dict(kwargs, hidden_states=torch.randn_like(kwargs["hidden_states"])))
    return [(inputs, other)[(call + 1) // 2 % 2] for call in range(CHUNK_CALLS)]


def time_stack(
    model: torch.nn.Module,
    inputs: tuple[tuple, dict[str, Any]],
    spec: CacheSpec,
    config: AgentSDConfig,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, dict[str, Any]]:
    """Milliseconds per call of the baseline, agentsd alone, and the cache alone and with agentsd
    by kind (`cache:computed`, `cache+agentsd:skipped`, ...), interleaved round by round (see the
    module docstring); keyed as `benchmark.time_methods`'s results. With `warmup=0`, one untimed
    call of the plain model comes first."""
    turns = _inputs_in_turn(inputs)
    loop = SimpleNamespace(transformer=model, current_timestep=FILL_TIMESTEP)  # what the caches read of a pipe
    results: dict[str, dict[str, Any]] = {}
    if warmup == 0:  # the cold start (allocations, kernel selection) charged to no method
        with torch.no_grad():
            model(*inputs[0], **inputs[1])
    for round_index in range(warmup + repeats):
        for plain, cached in (("baseline", "cache"), (AGENT, "cache+agentsd")):
            with torch.no_grad(), method_context(plain, model, config):
                with enabled_cache(loop, spec, STEPS), model.cache_context("bench"):
                    loop.current_timestep = FILL_TIMESTEP
                    for _ in range(FILL_CALLS.get(spec.name, 1)):  # untimed: a cache's first calls compute
                        model(*inputs[0], **inputs[1])
                    loop.current_timestep = CURRENT_TIMESTEP
                    seen: set[str] = set()
                    for call_inputs in turns:
                        with counting_skips(model, config) as calls:
                            elapsed, peak_mb = timed_call(model, call_inputs, model.device)
                        seen.add(KINDS[calls.skipped])
                        if round_index >= warmup:
                            _record(results, f"{cached}:{KINDS[calls.skipped]}", elapsed, peak_mb, model)
                        if seen == set(KINDS):
                            break
                # The cache off again, agentsd (when on) as patched for the cache's calls: none of them
                # the first call after the patch.
                with counting_skips(model, config):  # the same hooks as the cache's calls carry
                    elapsed, peak_mb = timed_call(model, inputs, model.device)
                if round_index >= warmup:
                    _record(results, plain, elapsed, peak_mb, model)
    return results


def _row(scenario: dict[str, Any], method: str, step: str, ms: float, base: float, measured: dict | None) -> dict:
    row = dict(scenario, method=method, step=step, median_ms=round(ms, 3), speedup=round(base / ms, 4))
    if measured:
        row.update(p10_ms=round(_percentile(measured["ms"], 0.1), 3), p90_ms=round(_percentile(measured["ms"], 0.9), 3),
                   peak_mb=round(measured["peak_mb"], 1), repeats=len(measured["ms"]),
                   agentsd_acted=measured.get("acted"), agentsd_exact_reason=measured.get("exact_reason"))  # fmt: skip
    return row


def stack_rows(
    timings: dict[str, dict[str, Any]], scenario: dict[str, Any], skip_fractions: Sequence[float]
) -> list[dict[str, Any]]:
    """The rows of one scenario: baseline and agentsd (`step` every), the cache alone and with
    agentsd per computed and skipped step, and both at each skip fraction f (`step` mix): (1 - f)
    x computed + f x skipped. Speedups are over the baseline; `over_cache` a stack row's over the
    cache row of the same step. A kind the cache never did in the run has no row (nor mix rows)."""
    median = {method: statistics.median(t["ms"]) for method, t in timings.items()}
    base = median["baseline"]
    rows = [_row(scenario, m, "every", median[m], base, timings[m]) for m in ("baseline", AGENT) if m in median]
    for method in ("cache", "cache+agentsd"):
        for kind in KINDS:
            key = f"{method}:{kind}"
            if key in median:
                rows.append(_row(scenario, method, kind, median[key], base, timings[key]))
        if all(f"{method}:{kind}" in median for kind in KINDS):
            for f in skip_fractions:
                ms = (1 - f) * median[f"{method}:computed"] + f * median[f"{method}:skipped"]
                rows.append(dict(_row(scenario, method, "mix", ms, base, None), skip_fraction=f))
    by = {(r["method"], r["step"], r.get("skip_fraction")): r for r in rows}
    for row in rows:
        cache = by.get(("cache", row["step"], row.get("skip_fraction")))
        if row["method"] == "cache+agentsd" and cache is not None:
            row["over_cache"] = round(cache["median_ms"] / row["median_ms"], 4)
    return [{k: row.get(k) for k in STACK_FIELDS} for row in rows]


def run_stack_benchmark(
    archs: Sequence[str],
    spec: CacheSpec,
    sizes: Sequence[Size] | None = None,
    batches: Sequence[int] = (1,),
    skip_fractions: Sequence[float] = DEFAULT_SKIP_FRACTIONS,
    preset: str | None = None,
    repeats: int = 3,
    warmup: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    frames: Sequence[int] | None = None,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
    build: Callable[[str], torch.nn.Module] | None = None,
) -> list[dict[str, Any]]:
    """`time_stack` for every (arch, size, frames, batch) scenario, as `benchmark.run_benchmark`
    runs its own (the same arguments); one model per architecture.

    Raises:
        ValueError: for a cache the bench cannot time on an architecture (`cache_problem`), before
            any model is built.
    """
    from ..api.presets import load_preset
    from .benchmark import DEFAULT_PRESETS, build_model

    for arch in archs:
        if problem := cache_problem(arch, spec):
            raise ValueError(f"--cache {spec.label}: {problem}.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    common = dict(run_info(device), dtype=str(dtype).replace("torch.", ""), preset=None, cache=spec.label)
    rows: list[dict[str, Any]] = []
    for arch in archs:
        model = None
        model = build(arch) if build else build_model(arch, device, dtype)
        name, blocks = split_arch(arch)
        preset_name = preset or DEFAULT_PRESETS[name]
        config = load_preset(preset_name)
        video = is_video(arch)
        for size in sizes or default_sizes(arch):
            for video_frames in list(frames or [DEFAULT_FRAMES]) if video else [None]:
                for batch in batches:
                    inputs = model_inputs(model, size, batch, frames=video_frames)
                    timings = time_stack(model, inputs, spec, config, repeats, warmup)
                    height, width = sides(size)
                    scenario = dict(common, arch=name, blocks=blocks, size=height, width=width if video else None,
                                    frames=video_frames, batch=batch, preset=Path(preset_name).stem,
                                    date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))  # fmt: skip
                    new = stack_rows(timings, scenario, skip_fractions)
                    rows += new
                    if on_rows is not None:
                        on_rows(new)
    return rows
