"""Speed and memory of one denoising step, side by side, on the real SD architectures.

The UNets (SD 1.5, 2.1, XL) and the diffusion transformers (SD 3.5 Medium and Large,
PixArt-Sigma, Flux.1-dev: `transformer_models`; the Wan 2.1 / 2.2 video transformers:
`wan_models`) are built from the published configs with random weights (speed does not depend
on the weights, and nothing is downloaded); a transformer may be built at its first K blocks
(`sd35-medium:2`; Flux: K double-stream and 2K single-stream blocks), its real widths kept. One
step is one model forward of a classifier-free-guidance batch (2 x images; Flux.1-dev,
guidance-distilled, 1 x images; Wan, whose pipelines call the transformer once for the prompt
and once for the negative prompt: one of those calls, 1 x videos). A video scenario has a
height, a width and a number of video frames (4 k + 1). All methods of a scenario run
interleaved in one process: warm-up rounds first and thrown away, then the repeats cycle
through the methods, so drift hits them alike. Speedups are against the baseline of the same run.

The methods (`bench_methods`): the baseline, xformers, the preset's agent and ToMe phases
(and their derived 50-step schedule), tomesd, the unfused reference and the ceiling, plus
opt-in ones; tomesd and xformers are UNet methods, skipped on the transformers. With
`compile` set, each method (or each of `compile_methods`) also runs under
`torch.compile(model)` as `<method>+compile`. Those rows are timed one method after the other
(one compilation each, thrown away with the warm-up rounds), not interleaved, and their
speedups and ceiling fractions are against the compiled baseline and the compiled ceiling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ..api.patch import patched_config
from ..api.presets import load_preset
from ..api.status import status
from ..core.config import AgentSDConfig
from .methods import (
    AGENTSD_METHODS,
    COMPILABLE,
    COMPILE_SUFFIX,
    METHODS,
    OPTIONAL_METHODS,
    ZeroCostAttention,
    ZeroCostFluxAttention,
    ZeroCostJointAttention,
    ZeroCostWanAttention,
    available_methods,
    method_context,
)
from .results import FIELDS, markdown_table, plot_speedups, run_info, scenario_rows, write_results
from .targets import CEILING_TARGET, TOMESD_TARGET, target_lines
from .timing import timed_call
from .transformer_models import (
    ALL_TRANSFORMERS,
    TRANSFORMERS,
    Size,
    build_transformer,
    sides,
    transformer_config,
    transformer_inputs,
)
from .unet_models import ARCHITECTURES, build_unet, unet_inputs
from .wan_models import DEFAULT_FRAMES, DEFAULT_SIZE

logger = logging.getLogger(__name__)

DEFAULT_PRESETS = {"sd15": "paper", "sd21": "sd21", "sdxl": "sdxl", "sd35-medium": "sd3", "sd35-large": "sd3",
                   "pixart-sigma": "pixart", "flux-dev": "flux", "wan2.1-1.3b": "wan", "wan2.1-14b": "wan",
                   "wan2.2-5b": "wan", "tiny": "paper", "tiny-sd2": "sd21", "tiny-sdxl": "sdxl", "tiny-sd35": "sd3",
                   "tiny-pixart": "pixart", "tiny-flux": "flux", "tiny-wan": "wan", "tiny-wan22": "wan"}  # fmt: skip
DEFAULT_IMAGE_SIZE = 512
# Methods that act on UNets only: not run on the diffusion transformers, with this note.
UNET_ONLY_METHODS = {
    "tomesd": "ToMe for SD patches UNet blocks only",
    "xformers": "the xformers row times diffusers' UNet processors",
}


def split_arch(arch: str) -> tuple[str, int | None]:
    """An architecture as `run_benchmark` takes it, `NAME` or `NAME:K` (a diffusion transformer's
    first K blocks), as (NAME, K or None: the whole model).

    Raises:
        ValueError: for an unknown name, a depth given to a UNet, or one outside the model's.
    """
    name, _, depth = arch.partition(":")
    if name not in DEFAULT_PRESETS:
        raise ValueError(f"unknown architecture {name!r}: use one of {', '.join(DEFAULT_PRESETS)}.")
    if not depth:
        return name, None
    if name not in ALL_TRANSFORMERS:
        raise ValueError(f"{arch!r}: only the diffusion transformers ({', '.join(TRANSFORMERS)}) have a depth to cut.")
    if not depth.isdigit():
        raise ValueError(f"{arch!r}: the depth after ':' must be a number of blocks, e.g. {name}:2.")
    blocks = int(depth)
    transformer_config(name, blocks)  # in range
    return name, None if blocks == ALL_TRANSFORMERS[name].depth else blocks


def with_blocks(archs: Sequence[str], blocks: int | None) -> list[str]:
    """`archs` with every diffusion transformer at its first `blocks` blocks (`sd35-medium:2`);
    UNets stay whole. None leaves them as they are."""
    if blocks is None:
        return list(archs)
    return [f"{arch}:{blocks}" if arch in ALL_TRANSFORMERS else arch for arch in archs]


def is_transformer(arch: str) -> bool:
    """Whether `arch` (`NAME` or `NAME:K`) is a diffusion transformer."""
    return arch.partition(":")[0] in ALL_TRANSFORMERS


def is_video(arch: str) -> bool:
    """Whether `arch` (`NAME` or `NAME:K`) is a video transformer (sizes `(height, width)` and frames)."""
    spec = ALL_TRANSFORMERS.get(arch.partition(":")[0])
    return spec is not None and spec.video


def default_sizes(arch: str) -> list[Size]:
    """The sizes `run_benchmark` times when given none: 512 px images, 480x832 px videos (Wan's 480p)."""
    return [DEFAULT_SIZE] if is_video(arch) else [DEFAULT_IMAGE_SIZE]


def build_model(arch: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random-weight model of `arch` (`NAME` or `NAME:K`, see `split_arch`) on `device`: a UNet
    (`build_unet`) or a diffusion transformer (`bench_dit.build_transformer`)."""
    name, blocks = split_arch(arch)
    if name in ALL_TRANSFORMERS:
        return build_transformer(name, device, dtype, blocks)
    return build_unet(name, device, dtype)


def model_inputs(
    model: torch.nn.Module,
    size: Size,
    images: int,
    timestep_device: torch.device | str | None = None,
    frames: int | None = None,
) -> tuple[tuple, dict[str, Any]]:
    """The model's (args, kwargs) for one step of `images` images of `size` px, as its
    pipeline passes them (`unet_inputs`, `transformer_models.transformer_inputs`: a CFG batch,
    except for guidance-distilled Flux.1-dev and Wan's one call of two per step); a video's size
    is (height, width), with `frames` video frames; the timestep (and Flux's position ids) made
    on `timestep_device` (default: the model's device)."""
    if isinstance(model, UNet2DConditionModel):
        height, width = sides(size)
        if height != width:
            raise ValueError(f"size {height}x{width}: the UNets take square images here.")
        return unet_inputs(model, height, images, timestep_device)
    return transformer_inputs(model, size, images, timestep_device, frames)


def _record(results: dict[str, dict[str, Any]], method: str, elapsed: float, peak_mb: float, model) -> None:
    """Add a timed call of `method`; for an agentsd method (patched in now), also whether some
    layer ran agent attention or token merging in the calls so far ("acted"), else why not."""
    entry = results.setdefault(method, {"ms": [], "peak_mb": 0.0})
    entry["ms"].append(elapsed)
    entry["peak_mb"] = max(entry["peak_mb"], peak_mb)
    if patched_config(model) is not None:
        activity = status(model).activity
        entry["acted"] = entry.get("acted", False) or any(activity.acting_calls.values())
        if not entry["acted"]:
            entry["exact_reason"] = next(iter(activity.reasons.values()), "every patched layer ran exact attention")


def time_methods(
    model: torch.nn.Module,
    inputs: tuple[tuple, dict[str, Any]],
    methods: Sequence[str],
    config: AgentSDConfig,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, dict[str, Any]]:
    """Milliseconds of each repeat and the peak memory per method, interleaved.

    With `warmup=0`, one untimed call of the plain model comes first: the cold start (allocations,
    kernel selection) would otherwise be charged to whichever method runs first."""
    results: dict[str, dict[str, Any]] = {}
    if warmup == 0:
        args, kwargs = inputs
        with torch.no_grad():
            model(*args, **kwargs)
    for round_index in range(warmup + repeats):
        for method in methods:
            with torch.no_grad(), method_context(method, model, config):
                elapsed, peak_mb = timed_call(model, inputs, model.device)
                if round_index >= warmup:
                    _record(results, method, elapsed, peak_mb, model)
    return results


def time_compiled(
    model: torch.nn.Module,
    inputs: tuple[tuple, dict[str, Any]],
    methods: Sequence[str],
    config: AgentSDConfig,
    repeats: int = 3,
    warmup: int = 1,
    backend: str = "inductor",
) -> dict[str, dict[str, Any]]:
    """Like `time_methods` under `torch.compile(model, backend=backend)`, one method after the
    other (a compilation each); results keyed `<method>+compile`. At least one warm-up round
    runs, so the compilation is never timed. tomesd and xformers are left out."""
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method not in COMPILABLE:
            continue
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        warm = max(warmup, 1)
        with torch.no_grad(), method_context(method, model, config):
            for round_index in range(warm + repeats):
                elapsed, peak_mb = timed_call(compiled, inputs, model.device)
                if round_index >= warm:
                    _record(results, method + COMPILE_SUFFIX, elapsed, peak_mb, model)
    torch._dynamo.reset()
    return results


def run_benchmark(
    archs: Sequence[str] = ("sd15",),
    sizes: Sequence[Size] | None = None,
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
    build: Callable[[str], torch.nn.Module] | None = None,
    frames: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark every (arch, size, batch) scenario; see the module docstring for the methods.

    Args:
        archs: architectures (`sd15`, `sd21`, `sdxl`, `sd35-medium`, `sd35-large`,
            `pixart-sigma`, `flux-dev`, `wan2.1-1.3b`, `wan2.1-14b`, `wan2.2-5b`, or a tiny
            stand-in of `DEFAULT_PRESETS`); a diffusion transformer as `NAME:K` is built at its
            first K blocks (`split_arch`, `with_blocks`).
        sizes: image sides in pixels (the latent is 1/8 of it); a video's (height, width) (one
            side: a square video). None: each architecture's default (`default_sizes`).
        batches: images per prompt; the model's batch is twice that (CFG), except Flux.1-dev's
            and Wan's (videos per call, one call of the step's two).
        methods: subset of `METHODS`; default every method that can run here. The UNet-only
            ones (`UNET_ONLY_METHODS`) are skipped on the transformers, with a warning.
        preset: agentsd preset (name or YAML); default per arch (`DEFAULT_PRESETS`).
        repeats, warmup: timed and discarded rounds per method.
        device, dtype: default CUDA in fp16 when present, else the CPU in fp32.
        compile: a torch.compile backend (`"inductor"`): also time the methods compiled.
        compile_methods: the methods to compile (default: every compilable one of `methods`).
        on_rows: called with each scenario's rows as soon as it finishes (to save as you go).
        build: returns the model of an architecture as given in `archs` (default:
            `build_model` on `device` in `dtype`); lets a caller keep a model between calls.
        frames: the video frames (4 k + 1) of every video scenario (default
            `wan_models.DEFAULT_FRAMES`, 81); image architectures ignore them.

    Returns:
        One row per scenario and method, with the fields of `FIELDS` (`blocks`: the depth of a
        truncated transformer, None for a whole model; `width` and `frames`: a video's, None
        for images). A scenario that runs out of memory is skipped with a warning.

    Raises:
        ValueError: for an unknown method or architecture (before any model is built).
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
    depths = {arch: split_arch(arch) for arch in archs}
    common = dict(run_info(device), dtype=str(dtype).replace("torch.", ""))
    rows: list[dict[str, Any]] = []
    scenarios = [(a, s, f, b) for a in archs for s in (sizes or default_sizes(a)) for f in _frames_of(a, frames)
                 for b in batches]  # fmt: skip
    bar = tqdm(scenarios, desc="scenarios", disable=not progress)
    model, built = None, None
    for arch, size, video_frames, batch in bar:
        height, width = sides(size)
        shown = f"{height}x{width}px, {video_frames} frames" if video_frames else f"{height}px"
        bar.set_postfix_str(f"{arch} {shown} x{batch}")
        if built != arch:
            model = None
            model, built = (build(arch) if build else build_model(arch, device, dtype)), arch
            here = _methods_of(arch, chosen)
        name, blocks = depths[arch]
        preset_name = preset or DEFAULT_PRESETS[name]
        config = load_preset(preset_name)
        try:
            inputs = model_inputs(model, size, batch, frames=video_frames)
            timings = time_methods(model, inputs, here, config, repeats, warmup)
            if compile:
                compiled = [m for m in here if compile_methods is None or m in compile_methods]
                timings.update(time_compiled(model, inputs, compiled, config, repeats, warmup, compile))
        except torch.OutOfMemoryError:
            logger.warning("%s at %s x%d ran out of memory: skipped", arch, shown, batch)
            torch.cuda.empty_cache()
            continue
        scenario = dict(common, arch=name, blocks=blocks, size=height, width=width if video_frames else None,
                        frames=video_frames, batch=batch, preset=Path(preset_name).stem)  # fmt: skip
        scenario["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        new = scenario_rows(timings, scenario, config)
        rows += new
        if on_rows is not None:
            on_rows(new)
    return rows


def _frames_of(arch: str, frames: Sequence[int] | None) -> list[int | None]:
    """The frame counts of `arch`'s scenarios: `frames` (default 81) for a video, [None] for images."""
    if not is_video(arch):
        return [None]
    return list(frames) if frames else [DEFAULT_FRAMES]


def _methods_of(arch: str, methods: list[str]) -> list[str]:
    """`methods` without the UNet-only ones when `arch` is a diffusion transformer (saying so)."""
    if not is_transformer(arch):
        return methods
    skipped = [m for m in methods if m in UNET_ONLY_METHODS]
    for method in skipped:
        logger.warning("%s: %s does not apply to diffusion transformers (%s): skipped", arch, method,
                       UNET_ONLY_METHODS[method])  # fmt: skip
    return [m for m in methods if m not in skipped]


__all__ = [  # the names of methods.py, results.py, targets.py and unet_models.py are re-exported: one import for all
    "AGENTSD_METHODS",
    "ARCHITECTURES",
    "CEILING_TARGET",
    "COMPILE_SUFFIX",
    "FIELDS",
    "METHODS",
    "OPTIONAL_METHODS",
    "TOMESD_TARGET",
    "TRANSFORMERS",
    "UNET_ONLY_METHODS",
    "ZeroCostAttention",
    "ZeroCostFluxAttention",
    "ZeroCostJointAttention",
    "ZeroCostWanAttention",
    "available_methods",
    "build_model",
    "build_unet",
    "default_sizes",
    "is_transformer",
    "is_video",
    "markdown_table",
    "method_context",
    "model_inputs",
    "plot_speedups",
    "run_benchmark",
    "scenario_rows",
    "split_arch",
    "target_lines",
    "time_compiled",
    "time_methods",
    "unet_inputs",
    "with_blocks",
    "write_results",
]
