"""Speed and memory of one denoising step, side by side, on the real SD architectures.

The UNets are built from the published configs with random weights (speed does not depend
on the weights, and nothing is downloaded). One step is one UNet forward of a
classifier-free-guidance batch (2 x images). All methods of a scenario run interleaved in
one process: warm-up rounds first and thrown away, then the repeats cycle through the
methods, so drift hits them alike. Speedups are against the baseline of the same run.

The methods (`bench_methods`): the baseline, xformers, the preset's agent and ToMe phases
(and their derived 50-step schedule), tomesd, the unfused reference and the ceiling, plus
opt-in ones. With `compile` set, each method (or each of `compile_methods`) also runs under
`torch.compile(unet)` as `<method>+compile`. Those rows are timed one method after the other
(one compilation each, thrown away with the warm-up rounds), not interleaved, and their
speedups and ceiling fractions are against the compiled baseline and the compiled ceiling.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from .bench_methods import (
    AGENTSD_METHODS,
    COMPILABLE,
    METHODS,
    OPTIONAL_METHODS,
    ZeroCostAttention,
    available_methods,
    method_context,
)
from .config import AgentSDConfig
from .patch import patched_config
from .presets import load_preset
from .results import (
    CEILING_TARGET,
    COMPILE_SUFFIX,
    FIELDS,
    TOMESD_TARGET,
    markdown_table,
    plot_speedups,
    run_info,
    scenario_rows,
    target_lines,
    write_results,
)
from .status import status

logger = logging.getLogger(__name__)

# The published UNet configs (diffusers format) of the architectures benchmarked.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        sample_size=64,
    ),
    "sd21": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        sample_size=96,
    ),
    "sdxl": dict(
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        sample_size=128,
    ),
}
# The tiny architectures (agentsd.testing) stand in for the real ones in tests.
TINY_ARCHITECTURES = {"tiny": "sd15", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
DEFAULT_PRESETS = {"sd15": "paper", "sd21": "sd21", "sdxl": "sdxl", "tiny": "paper", "tiny-sd2": "sd21",
                   "tiny-sdxl": "sdxl"}  # fmt: skip
LATENT_FACTOR = 8  # image pixels per latent pixel in every SD VAE


def build_unet(arch: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A random-weight UNet of `arch`, built on `device` (so its weights are drawn there).

    Args:
        arch: `sd15`, `sd21`, `sdxl`, or one of `TINY_ARCHITECTURES` for tests.
        device, dtype: where the UNet lives and its dtype.
    """
    if arch not in ARCHITECTURES and arch not in TINY_ARCHITECTURES:
        known = ", ".join([*ARCHITECTURES, *TINY_ARCHITECTURES])
        raise ValueError(f"unknown architecture {arch!r}: use one of {known}.")
    with torch.device(device):
        if arch in TINY_ARCHITECTURES:
            from .testing import tiny_unet

            unet = tiny_unet(TINY_ARCHITECTURES[arch])
        else:
            unet = UNet2DConditionModel(**ARCHITECTURES[arch])
    # nn.Module.to, not diffusers' override: that one warns about modules to keep in fp32, which
    # matters for loaded weights only (a random-weight UNet has none to keep).
    return torch.nn.Module.to(unet, dtype=dtype).eval()


def unet_inputs(unet: UNet2DConditionModel, size: int, images: int) -> tuple[tuple, dict[str, Any]]:
    """The UNet's (args, kwargs) for one CFG step of `images` images of `size` x `size` pixels,
    passed as the pipelines pass them (sample and timestep positional)."""
    if size % LATENT_FACTOR:
        raise ValueError(f"size {size} is not a multiple of {LATENT_FACTOR}.")
    batch, side = 2 * images, size // LATENT_FACTOR
    generator = torch.Generator().manual_seed(0)
    config, device, dtype = unet.config, unet.device, unet.dtype

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    args = (randn(batch, config.in_channels, side, side), torch.tensor(500, device=device))
    kwargs: dict[str, Any] = dict(encoder_hidden_states=randn(batch, 77, config.cross_attention_dim))
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=dtype, device=device).repeat(batch, 1)
        kwargs["added_cond_kwargs"] = dict(text_embeds=randn(batch, pooled), time_ids=time_ids)
    return args, kwargs


class PeakMemory:
    """Peak memory of the code inside: CUDA's max allocated (weights included), or on the CPU
    the growth of the process RSS over its value on entry, sampled every 5 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            self._process = psutil.Process()
            self._stop = threading.Event()
            self._start = self._rss = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._rss = max(self._rss, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._rss, self._process.memory_info().rss) - self._start) / 2**20


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(model: Callable, inputs: tuple[tuple, dict[str, Any]], device: torch.device) -> tuple[float, float]:
    """(milliseconds, peak MB) of one call of `model` on `inputs`."""
    args, kwargs = inputs
    with PeakMemory(device) as memory:
        _synchronize(device)
        start = time.perf_counter()
        model(*args, **kwargs)
        _synchronize(device)
        elapsed = (time.perf_counter() - start) * 1000
    return elapsed, memory.peak_mb


def _record(results: dict[str, dict[str, Any]], method: str, elapsed: float, peak_mb: float, unet) -> None:
    """Add a timed call of `method`; for an agentsd method (patched in now), also whether some
    layer ran agent attention or token merging in the calls so far ("acted"), else why not."""
    entry = results.setdefault(method, {"ms": [], "peak_mb": 0.0})
    entry["ms"].append(elapsed)
    entry["peak_mb"] = max(entry["peak_mb"], peak_mb)
    if patched_config(unet) is not None:
        activity = status(unet).activity
        entry["acted"] = entry.get("acted", False) or any(activity.acting_calls.values())
        if not entry["acted"]:
            entry["exact_reason"] = next(iter(activity.reasons.values()), "every patched layer ran exact attention")


def time_methods(
    unet: UNet2DConditionModel,
    inputs: tuple[tuple, dict[str, Any]],
    methods: Sequence[str],
    config: AgentSDConfig,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, dict[str, Any]]:
    """Milliseconds of each repeat and the peak memory per method, interleaved.

    With `warmup=0`, one untimed call of the plain UNet comes first: the cold start (allocations,
    kernel selection) would otherwise be charged to whichever method runs first."""
    results: dict[str, dict[str, Any]] = {}
    if warmup == 0:
        args, kwargs = inputs
        with torch.no_grad():
            unet(*args, **kwargs)
    for round_index in range(warmup + repeats):
        for method in methods:
            with torch.no_grad(), method_context(method, unet, config):
                elapsed, peak_mb = _timed_call(unet, inputs, unet.device)
                if round_index >= warmup:
                    _record(results, method, elapsed, peak_mb, unet)
    return results


def time_compiled(
    unet: UNet2DConditionModel,
    inputs: tuple[tuple, dict[str, Any]],
    methods: Sequence[str],
    config: AgentSDConfig,
    repeats: int = 3,
    warmup: int = 1,
    backend: str = "inductor",
) -> dict[str, dict[str, Any]]:
    """Like `time_methods` under `torch.compile(unet, backend=backend)`, one method after the
    other (a compilation each); results keyed `<method>+compile`. At least one warm-up round
    runs, so the compilation is never timed. tomesd and xformers are left out."""
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method not in COMPILABLE:
            continue
        torch._dynamo.reset()
        compiled = torch.compile(unet, backend=backend)
        warm = max(warmup, 1)
        with torch.no_grad(), method_context(method, unet, config):
            for round_index in range(warm + repeats):
                elapsed, peak_mb = _timed_call(compiled, inputs, unet.device)
                if round_index >= warm:
                    _record(results, method + COMPILE_SUFFIX, elapsed, peak_mb, unet)
    torch._dynamo.reset()
    return results


def run_benchmark(
    archs: Sequence[str] = ("sd15",),
    sizes: Sequence[int] = (512,),
    batches: Sequence[int] = (1,),
    methods: Sequence[str] | None = None,
    preset: str | None = None,
    repeats: int = 3,
    warmup: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    compile: str | None = None,
    compile_methods: Sequence[str] | None = None,
    progress: bool = True,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
    build: Callable[[str], UNet2DConditionModel] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark every (arch, size, batch) scenario; see the module docstring for the methods.

    Args:
        archs: architectures (`sd15`, `sd21`, `sdxl`, `tiny`).
        sizes: image sides in pixels (the latent is 1/8 of it).
        batches: images per prompt; the UNet batch is twice that (CFG).
        methods: subset of `METHODS`; default every method that can run here.
        preset: agentsd preset (name or YAML); default per arch (`DEFAULT_PRESETS`).
        repeats, warmup: timed and discarded rounds per method.
        device, dtype: default CUDA in fp16 when present, else the CPU in fp32.
        compile: a torch.compile backend (`"inductor"`): also time the methods compiled.
        compile_methods: the methods to compile (default: every compilable one of `methods`).
        on_rows: called with each scenario's rows as soon as it finishes (to save as you go).
        build: returns the UNet of an architecture (default: `build_unet` on `device` in
            `dtype`); lets a caller keep a UNet between calls.

    Returns:
        One row per scenario and method, with the fields of `FIELDS`. A scenario that runs
        out of memory is skipped with a warning.
    """
    from tqdm.auto import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    chosen = list(methods) if methods else available_methods(device)
    if "baseline" not in chosen:
        chosen.insert(0, "baseline")
    unknown = sorted(set(chosen) - set(METHODS) - set(OPTIONAL_METHODS))
    if unknown:
        known = ", ".join(METHODS + OPTIONAL_METHODS)
        raise ValueError(f"unknown methods {', '.join(unknown)}: use any of {known}.")
    common = dict(run_info(device), dtype=str(dtype).replace("torch.", ""))
    rows: list[dict[str, Any]] = []
    scenarios = [(a, s, b) for a in archs for s in sizes for b in batches]
    bar = tqdm(scenarios, desc="scenarios", disable=not progress)
    unet, built = None, None
    for arch, size, batch in bar:
        bar.set_postfix_str(f"{arch} {size}px x{batch}")
        if built != arch:
            unet = None
            unet, built = (build(arch) if build else build_unet(arch, device, dtype)), arch
        name = preset or DEFAULT_PRESETS[arch]
        config = load_preset(name)
        try:
            inputs = unet_inputs(unet, size, batch)
            timings = time_methods(unet, inputs, chosen, config, repeats, warmup)
            if compile:
                compiled = [m for m in chosen if compile_methods is None or m in compile_methods]
                timings.update(time_compiled(unet, inputs, compiled, config, repeats, warmup, compile))
        except torch.OutOfMemoryError:
            logger.warning("%s at %d px x%d ran out of memory: skipped", arch, size, batch)
            torch.cuda.empty_cache()
            continue
        scenario = dict(common, arch=arch, size=size, batch=batch, preset=Path(name).stem)
        scenario["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        new = scenario_rows(timings, scenario, config)
        rows += new
        if on_rows is not None:
            on_rows(new)
    return rows


__all__ = [  # the names of bench_methods.py and results.py are re-exported: one import for all
    "AGENTSD_METHODS",
    "ARCHITECTURES",
    "CEILING_TARGET",
    "COMPILE_SUFFIX",
    "FIELDS",
    "METHODS",
    "OPTIONAL_METHODS",
    "TOMESD_TARGET",
    "ZeroCostAttention",
    "available_methods",
    "build_unet",
    "markdown_table",
    "method_context",
    "plot_speedups",
    "run_benchmark",
    "scenario_rows",
    "target_lines",
    "time_compiled",
    "time_methods",
    "unet_inputs",
    "write_results",
]
