"""FLOPs of one model call, counted on the meta device: what the GPU suite's time estimates rest on
(`estimate.py`), what its one-step scenarios report their throughput against (`step.py`), and the
FLOP table of a denoising step (`step_flops`, `flop_table`; `scripts/flop_table.py`): the share of
the self-attention products and the speedups the FLOPs bound.

`torch.utils.flop_counter.FlopCounterMode` counts a call of the real architecture on the meta
device (no memory, no weights, well under a second per call on any CPU; each count is cached).
Methods that cannot run on the meta device (tomesd, xformers) are counted as the baseline, an
upper bound for them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..api.presets import load_preset
from ..bench import benchmark, wan_models
from ..bench.transformer_models import Size, sides

META_COUNTED = ("baseline", "agentsd-agent", "agentsd-tome", "highres", "ceiling", "ceiling-2", "ceiling-products")


def model_call_flops(model: Any, size: Size, images: int, method: str, config: Any, frames: int | None = None) -> float:
    """FLOPs of one model call (UNet or transformer) of `images` CFG images of `size` px as
    `method`, on the meta device (a video's size is (height, width), of `frames` frames).

    The timestep (and Flux's position ids) are made on the CPU: agentsd's hook reads their
    values, which a meta tensor has not. A UNet moves the timestep to the latent's device
    itself; a transformer's host inputs are moved by a hook that runs after agentsd's."""
    args, kwargs = benchmark.model_inputs(model, size, images, timestep_device="cpu", frames=frames)
    counted = method if method in META_COUNTED else "baseline"
    with torch.no_grad(), benchmark.method_context(counted, model, config):
        moved = model.register_forward_pre_hook(_host_inputs_to_meta, with_kwargs=True)  # after agentsd's
        try:
            with FlopCounterMode(display=False) as flops:
                model(*args, **kwargs)
        finally:
            moved.remove()
    return float(flops.get_total_flops())


# The keyword inputs `model_call_flops` makes on the CPU for agentsd's hook to read.
HOST_INPUTS = ("timestep", "img_ids", "txt_ids")


def _host_inputs_to_meta(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    moved = {k: kwargs[k].to("meta") for k in HOST_INPUTS if isinstance(kwargs.get(k), torch.Tensor)}
    return args, dict(kwargs, **moved)


@functools.cache
def meta_model(arch: str) -> Any:
    """`arch`'s model on the meta device (no memory, no weights), built once per run."""
    # The meta device, also for the tiny models: torch's flop counter does not count the CPU's
    # fused attention kernel.
    return benchmark.build_model(arch, "meta", torch.float16)


@functools.cache
def call_flops(
    arch: str, size: Size, images: int, method: str, preset: str | None = None, frames: int | None = None
) -> float:
    """`model_call_flops` of `arch` with its default preset (or `preset`), counted once per run."""
    counted = method if method in META_COUNTED else "baseline"
    if counted != method:
        return call_flops(arch, size, images, counted, preset, frames)
    config = load_preset(preset or benchmark.DEFAULT_PRESETS[benchmark.split_arch(arch)[0]])
    return model_call_flops(meta_model(arch), size, images, method, config, frames)


def calls_per_step(arch: str) -> int:
    """Model calls per denoising step of one image or video with guidance: Wan pipelines call the
    transformer twice (the prompt, then the negative prompt); the others make one call of a
    guidance batch (Flux.1-dev: of one sample, guidance-distilled)."""
    return 2 if benchmark.is_video(arch) else 1


def step_flops(arch: str, size: Size, frames: int | None = None, preset: str | None = None) -> dict[str, Any]:
    """One denoising step's FLOPs (`calls_per_step` calls of one image or video) and the speedups
    they bound, as a row of the FLOP table.

    Fields: the scenario (arch, blocks, size, width, frames, tokens: a video's token grid, None
    for images), `baseline_tflop`, `products_share` (the self-attention products of the patched
    layers over the step: what `ceiling-products` drops), `products_bound` (the step's speedup
    with those products free), `ceiling_bound` (with the patched layers free, projections too),
    `agent_tflop`, `agent_speedup` and `schedule_speedup` (the preset's agent phase and its
    `agent_steps` mix with the ToMe phase, by FLOPs).
    """
    name, blocks = benchmark.split_arch(arch)
    config = load_preset(preset or benchmark.DEFAULT_PRESETS[name])
    calls = calls_per_step(arch)
    methods = ("baseline", "ceiling-products", "ceiling", "agentsd-agent", "agentsd-tome")
    step = {m: calls * call_flops(arch, size, 1, m, preset, frames) for m in methods}
    base = step["baseline"]
    schedule = config.agent_steps * step["agentsd-agent"] + (1 - config.agent_steps) * step["agentsd-tome"]
    height, width = sides(size)
    tokens = None
    if frames is not None:
        grid = wan_models.token_grid(meta_model(arch).config, height, width, frames)
        tokens = grid[0] * grid[1] * grid[2]
    return dict(arch=name, blocks=blocks, size=height, width=width if frames is not None else None, frames=frames,
                tokens=tokens, calls=calls, baseline_tflop=base / 1e12,
                products_share=(base - step["ceiling-products"]) / base,
                products_bound=base / step["ceiling-products"], ceiling_bound=base / step["ceiling"],
                agent_tflop=step["agentsd-agent"] / 1e12, agent_speedup=base / step["agentsd-agent"],
                schedule_speedup=base / schedule)  # fmt: skip


FLOP_COLUMNS = ("arch", "size", "tokens", "calls", "baseline_tflop", "products_share", "products_bound",
                "ceiling_bound", "agent_tflop", "agent_speedup", "schedule_speedup")  # fmt: skip


def flop_table(rows: Sequence[dict[str, Any]]) -> str:
    """`step_flops` rows as a Markdown table: TFLOP per step, the products' share in percent,
    the bounds and speedups as factors."""
    from ..bench.targets import arch_label, size_text

    lines = ["| " + " | ".join(FLOP_COLUMNS) + " |", "|" + "---|" * len(FLOP_COLUMNS)]
    for row in rows:
        cells = dict(row, arch=arch_label(row["arch"], row["blocks"]),
                     size=size_text(row["size"], row["width"], row["frames"]))  # fmt: skip
        for key in ("baseline_tflop", "agent_tflop"):
            cells[key] = f"{row[key]:,.1f}"
        cells["products_share"] = f"{row['products_share']:.1%}"
        for key in ("products_bound", "ceiling_bound", "agent_speedup", "schedule_speedup"):
            cells[key] = f"{row[key]:.2f}x"
        lines.append("| " + " | ".join("" if cells[c] is None else str(cells[c]) for c in FLOP_COLUMNS) + " |")
    return "\n".join(lines) + "\n"
