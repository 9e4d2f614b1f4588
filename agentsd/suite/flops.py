"""FLOPs of one model call, counted on the meta device: what the GPU suite's time estimates rest on
(`estimate.py`) and what its one-step scenarios report their throughput against (`step.py`).

`torch.utils.flop_counter.FlopCounterMode` counts a call of the real architecture on the meta
device (no memory, no weights, well under a second per call on any CPU; each count is cached).
Methods that cannot run on the meta device (tomesd, xformers) are counted as the baseline, an
upper bound for them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..api.presets import load_preset
from ..bench import benchmark

META_COUNTED = ("baseline", "agentsd-agent", "agentsd-tome", "highres", "ceiling", "ceiling-2")


def model_call_flops(model: Any, size: int, images: int, method: str, config: Any) -> float:
    """FLOPs of one model call (UNet or transformer) of `images` CFG images of `size` px as
    `method`, on the meta device.

    The timestep (and Flux's position ids) are made on the CPU: agentsd's hook reads their
    values, which a meta tensor has not. A UNet moves the timestep to the latent's device
    itself; a transformer's host inputs are moved by a hook that runs after agentsd's."""
    args, kwargs = benchmark.model_inputs(model, size, images, timestep_device="cpu")
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
def _meta_model(arch: str) -> Any:
    # The meta device, also for the tiny models: torch's flop counter does not count the CPU's
    # fused attention kernel.
    return benchmark.build_model(arch, "meta", torch.float16)


@functools.cache
def call_flops(arch: str, size: int, images: int, method: str, preset: str | None = None) -> float:
    """`model_call_flops` of `arch` with its default preset (or `preset`), counted once per run."""
    counted = method if method in META_COUNTED else "baseline"
    if counted != method:
        return call_flops(arch, size, images, counted, preset)
    config = load_preset(preset or benchmark.DEFAULT_PRESETS[benchmark.split_arch(arch)[0]])
    return model_call_flops(_meta_model(arch), size, images, method, config)
