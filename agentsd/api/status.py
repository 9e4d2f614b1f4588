"""What a patch does now: a small, printable report of a patched model (UNet or transformer).

>>> print(agentsd.status(pipe))  # doctest: +SKIP
>>> agentsd.status(pipe).activity.summary()  # doctest: +SKIP
'agentsd: 20 UNet calls since patching (8 agent phase, 12 ToMe phase); agent attention on 8 calls (3 of 3 layers), ...'
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..core.config import AgentSDConfig
from ..core.plans import CACHED, COMPUTED, SKIPPED
from ..core.state import AGENT, EXACT, TOME
from ..families import find_model
from ..processors.self_attention import choose_backend
from .follow import blocker as _blocker
from .follow import delegate_of as _delegate_of
from .follow import is_ours as _is_ours
from .patch import PATCH_ATTR, _model_of, current_phase
from .words import plural


@dataclass(frozen=True)
class LayerStatus:
    """One patched layer.

    Attributes:
        name: its processor name in `unet.attn_processors`.
        downsample: its level's downsampling relative to the latent.
        processor: the class of the processor agentsd delegates to (the user's latest).
        backend: the attention kernel agentsd's calls use on the model's device.
        mode: what it did in the latest UNet call: "agent", "tome" or "exact", or "cached" when a
            step cache skipped its block; None before one.
        grid: its token grid in the latest call: (rows, columns), or a video's (frames, rows, columns).
        merged: N', the tokens attention ran over after the ToMe merge.
        agents: n, the agent count, in the agent mode.
        reason: why it ran exact attention, or why agentsd cannot act on it.
        calls: UNet calls since patching, per mode ("cached": a step cache skipped its block).
    """

    name: str
    downsample: int
    processor: str
    backend: str
    mode: str | None = None
    grid: tuple[int, ...] | None = None
    merged: int | None = None
    agents: int | None = None
    reason: str | None = None
    calls: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Activity:
    """What agentsd did over a number of model calls; activities of several patches add up.

    Attributes:
        phase_calls: UNet calls per schedule phase ("agent", "tome").
        acting_calls: UNet calls in which at least one layer ran each mode ("agent", "tome").
        layer_calls: per layer, its calls per mode ("agent", "tome", "exact").
        reasons: per layer that ran exact attention or was out of reach, the latest reason.
        model: what the calls went to, for the summary: "UNet" or "transformer".
        cache_calls: calls in which every patched layer ran ("computed"), and those in which a step
            cache (`transformer.enable_cache`) skipped the blocks of some ("skipped"); the model
            call happens either way, and its phase is the schedule's.
    """

    phase_calls: dict[str, int] = field(default_factory=dict)
    acting_calls: dict[str, int] = field(default_factory=dict)
    layer_calls: dict[str, dict[str, int]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    model: str = "UNet"
    cache_calls: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: Activity) -> Activity:
        layers: dict[str, Counter] = {}
        for source in (self.layer_calls, other.layer_calls):
            for name, calls in source.items():
                layers.setdefault(name, Counter()).update(calls)
        return Activity(
            dict(Counter(self.phase_calls) + Counter(other.phase_calls)),
            dict(Counter(self.acting_calls) + Counter(other.acting_calls)),
            {name: dict(calls) for name, calls in layers.items()},
            {**self.reasons, **other.reasons},
            self.model if self.calls else other.model,
            dict(Counter(self.cache_calls) + Counter(other.cache_calls)),
        )

    @property
    def calls(self) -> int:
        return sum(self.phase_calls.values())

    @property
    def ran_agent_attention(self) -> bool:
        return self.acting_calls.get(AGENT, 0) > 0

    @property
    def skipped_calls(self) -> int:
        """Calls in which a step cache skipped the blocks of some patched layers."""
        return self.cache_calls.get(SKIPPED, 0)

    def layers_running(self, mode: str) -> list[str]:
        return [name for name, calls in self.layer_calls.items() if calls.get(mode, 0) > 0]

    def summary(self) -> str:
        """One line: the calls since patching per phase, in how many of them and in how many layers
        agent attention and token merging ran, and why layers stayed exact (the latest reason)."""
        if not self.calls:
            return f"agentsd: no {self.model} call yet"
        total = len(self.layer_calls)
        phases = f"{self.phase_calls.get(AGENT, 0)} agent phase, {self.phase_calls.get(TOME, 0)} ToMe phase"
        done = [
            f"{label} on {plural(self.acting_calls[mode], 'call')} ({len(self.layers_running(mode))} of "
            f"{plural(total, 'layer')})"
            for mode, label in ((AGENT, "agent attention"), (TOME, "token merging"))
            if self.acting_calls.get(mode)
        ]
        line = f"agentsd: {plural(self.calls, self.model + ' call')} since patching ({phases}); " + (
            ", ".join(done) if done else "no layer ran agent attention or token merging"
        )
        exact = {name: r for name, r in self.reasons.items() if name not in self._acting_layers()}
        if exact:
            name, reason = next(iter(exact.items()))
            more = f" and {len(exact) - 1} more" if len(exact) > 1 else ""
            line += f"; always exact: {_short(name)}{more} ({reason})"
        if self.skipped_calls:
            computed = self.cache_calls.get(COMPUTED, 0)
            line += f"; calls: {computed} computed, {self.skipped_calls} skipped (their blocks cached)"
        return line

    def _acting_layers(self) -> set[str]:
        return set(self.layers_running(AGENT)) | set(self.layers_running(TOME))


@dataclass(frozen=True)
class PatchStatus:
    """The state of agentsd on one model (see `status`).

    Attributes:
        latent: the latest call's latent sides (a UNet) or token grid (a transformer): (rows,
            columns), or a video's (frames, rows, columns).
        size: the same in words: "latent 64x64", "token grid 16x16", "token grid 21x30x52"; under
            context parallelism, each rank's shard of it.
        parallel: diffusers' context-parallel layout of the model, in words ("context parallel:
            ulysses 2 x ring 1 = 2 ranks, 5,120 tokens per rank"); None without one.
    """

    installed: bool
    acting: bool
    config: AgentSDConfig | None = None
    latent: tuple[int, ...] | None = None
    phase: str | None = None
    layers: tuple[LayerStatus, ...] = ()
    activity: Activity = field(default_factory=Activity)
    size: str | None = None
    parallel: str | None = None

    def __str__(self) -> str:
        if not self.installed:
            return "agentsd: not patched"
        head = "agentsd: patched" if self.acting else "agentsd: patched, but acting on no layer"
        latest = f"no {self.activity.model} call yet"
        if self.latent is not None:
            latest = f"latest call: {self.size}, {self.phase} phase"
        lines = [f"{head}; {len(self.layers)} layers; {latest}", self.activity.summary()]
        if self.parallel:
            lines.insert(1, self.parallel)
        for layer in self.layers:
            grid = "x".join(map(str, layer.grid)) if layer.grid else "-"
            what = layer.mode or "-"
            if layer.mode == AGENT:
                what += f" (N'={layer.merged}, n={layer.agents})"
            elif layer.mode == TOME:
                what += f" (N'={layer.merged})"
            elif layer.mode == CACHED:
                what += ": its block skipped by a step cache"
            if layer.reason:
                what += f": {layer.reason}"
            lines.append(
                f"  {_short(layer.name)} [x{layer.downsample}, grid {grid}, {layer.processor}, {layer.backend}] {what}"
            )
        return "\n".join(lines)


def status(pipe_or_unet: Any) -> PatchStatus:
    """What agentsd does on this pipeline or UNet now: the patched layers with their grids, what
    each did in the latest UNet call and why a layer ran exact attention, the processor each
    delegates to and the attention kernel, and counters since patching. `print` it for a report;
    `.activity.summary()` is one line.

    Raises:
        TypeError: for an object holding no model of a family agentsd patches.
    """
    kind, unet = find_model(pipe_or_unet)
    record = getattr(unet, PATCH_ATTR, None)
    if record is None:
        return PatchStatus(installed=False, acting=False)
    state = record.state
    call = state.view  # the current thread's latest call, else the latest in any thread
    blocked = {layer.name: _blocker(layer, record) for layer in record.layers}
    phases, acting, per_layer, cache = state.counts()
    modes = call.outcomes(ended=call.counted) if call is not None else {}
    latest_reasons = {**call.reasons, **call.handed_over} if call is not None else {}
    reasons = {**latest_reasons, **{n: r for n, r in blocked.items() if r}}
    layers = []
    for layer in record.layers:
        plan = call.plans.get(layer.name) if call is not None else None
        processor = layer.module.processor
        ours = _is_ours(processor, record)
        delegate = _delegate_of(processor)
        reason = reasons.get(layer.name)
        if not ours and blocked[layer.name] is None:
            reason = f"processor replaced by {type(delegate).__name__}: agentsd wraps it at the next UNet call"
        mode = modes.get(layer.name)
        layers.append(
            LayerStatus(
                name=layer.name,
                downsample=layer.downsample,
                processor=type(delegate).__name__,
                backend=choose_backend(state.config.attention_backend, delegate, unet.device),
                mode=mode,
                grid=_sides(plan, call) if plan is not None else _grid(call, layer.downsample),
                merged=plan.merged_tokens if plan is not None and mode in (AGENT, TOME) else None,
                agents=plan.agents if plan is not None and mode == AGENT else None,
                reason=reason if mode in (None, EXACT) or not ours else None,
                calls=dict(per_layer.get(layer.name, {})),
            )
        )
    activity = Activity(
        dict(phases),
        dict(acting),
        {name: dict(calls) for name, calls in per_layer.items()},
        {name: reasons[name] for name in reasons if name in {layer.name for layer in record.layers}},
        kind.noun,
        dict(cache),
    )
    return PatchStatus(
        installed=True,
        acting=any(reason is None for reason in blocked.values()),
        config=state.config,
        latent=call.sides if call is not None else None,
        size=call.size if call is not None else None,
        phase=call.phase if call is not None else None,
        parallel=_parallel_layout(unet, call),
        layers=tuple(layers),
        activity=activity,
    )


def _parallel_layout(model: Any, call: Any) -> str | None:
    """diffusers' context-parallel layout of `model` (`enable_parallelism`), in words."""
    parallel = getattr(model, "_parallel_config", None)
    config = getattr(parallel, "context_parallel_config", None)
    if config is None:
        return None
    ulysses, ring = config.ulysses_degree or 1, config.ring_degree or 1
    line = f"context parallel: ulysses {ulysses} x ring {ring} = {ulysses * ring} ranks"
    if call is not None and call.sequence.ranks > 1:
        tokens = math.prod(call.sides) + call.sequence.lead + call.sequence.tail
        line += f", {tokens:,} tokens per rank (agentsd acts on the shards)"
    return line


def _sides(plan: Any, call: Any) -> tuple[int, ...]:
    """A layer plan's grid: (rows, columns), or in a video's call (frames, rows, columns)."""
    return (plan.h, plan.w) if call.frames is None else (plan.f, plan.h, plan.w)


def _grid(call: Any, downsample: int) -> tuple[int, ...] | None:
    if call is None:
        return None
    height, width = call.latent_hw
    sides = (-(-height // downsample), -(-width // downsample))
    return sides if call.frames is None else (call.frames, *sides)


def _short(name: str) -> str:
    return name.removesuffix(".processor")


@contextmanager
def recording_phases(pipe_or_unet: Any) -> Iterator[list[str]]:
    """In the block, the phase of each UNet call, in order: "agent" or "tome" when some layer ran
    agent attention or token merging in it, "exact" otherwise. Reads no tensor (no host sync).

    Example:
        >>> with recording_phases(pipe) as phases:  # doctest: +SKIP
        ...     pipe("a photo of a cat", num_inference_steps=5)
        >>> phases  # doctest: +SKIP
        ['agent', 'agent', 'tome', 'tome', 'tome']
    """
    unet = _model_of(pipe_or_unet)
    phases: list[str] = []
    handle = unet.register_forward_hook(lambda *_: phases.append(current_phase(unet) or EXACT))
    try:
        yield phases
    finally:
        handle.remove()


PHASE_NAMES = {AGENT: "agent attention", TOME: "token merging", EXACT: "exact attention"}


def describe_phases(phases: Sequence[str]) -> str:
    """UNet calls grouped into runs of one phase, numbered from 1: "1-8 agent attention, 9-20
    token merging"."""
    runs: list[list] = []  # [first, last, phase]
    for number, phase in enumerate(phases, start=1):
        if runs and runs[-1][2] == phase:
            runs[-1][1] = number
        else:
            runs.append([number, number, phase])
    return ", ".join(
        f"{first}{'' if first == last else f'-{last}'} {PHASE_NAMES.get(phase, phase)}" for first, last, phase in runs
    )
