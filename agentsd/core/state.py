"""The run-time state of one patched UNet, and the plan of each of its calls.

Everything decided for one UNet call (the phase, every layer's grid, destination draw and merge
sizes, the matchings shared within the call) lives in that call's `CallPlan`. The plan belongs
to the thread that runs the call, so one patched UNet can serve several requests at once (one
pipeline per request made with `from_pipe`, all sharing the UNet, called from several threads):
each call gets exactly what it would get alone. What outlives a call is only what it did, added
to counters under a lock.

Host-device traffic, on a GPU: `begin_call` runs once per UNet call, in the UNet's forward
pre-hook, outside any compiled graph. It reads the timestep as a Python number (the one
host-device synchronisation agentsd adds to a UNet call, when the pipeline passes the timestep
as a device tensor) and sends the destination and source positions of every patched layer to
the device in a single non-blocking copy from pinned memory. The processors themselves never
synchronise: they look their plan up and launch kernels.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Collection

import torch

from .config import AgentSDConfig
from .merge import destination_indices, merge_count, source_indices
from .plans import (
    AGENT,
    BY_DESIGN,
    CACHED,
    COMPUTED,
    EXACT,
    SKIPPED,
    SMALL_GRID,
    TOME,
    CallPlan,
    LayerPlan,
    PhaseSettings,
    Sequence,
)
from .progress import Clock, TrainingTimesteps

logger = logging.getLogger(__name__)


class _ThreadCalls(threading.local):
    """The UNet call each thread runs now (or ran last)."""

    call: CallPlan | None = None


class AgentSDState:
    """Run-time state shared by every patched layer of one UNet.

    The UNet's forward pre-hook calls `begin_call` with the latent and the timestep. Every
    decision that depends only on them is made there, once per UNet call, outside any compiled
    graph, into a `CallPlan` of the calling thread; the processors look their plan up in it.
    The destination draws come from a generator seeded from `config.seed` and the timestep, so
    a pipeline call is reproducible and concurrent calls never share a draw.

    Args:
        config: the agent-attention configuration.
        clock: reads progress along the trajectory from the timestep (`agentsd.core.progress`);
            training timesteps with T = 1000 when None.
    """

    def __init__(self, config: AgentSDConfig, clock: Clock | None = None):
        self.config = config
        self.clock: Clock = clock or TrainingTimesteps()
        self.layers: dict[str, int] = {}
        # Layers agentsd cannot act on (set by the patch), and why.
        self.blocked: dict[str, str] = {}
        # False once unpatched: a stale agentsd processor put back later only delegates.
        self.active = True
        self._setup()

    def _setup(self) -> None:
        """The parts that are not copied with the state (see `__getstate__`)."""
        self._calls = _ThreadCalls()
        self._lock = threading.Lock()
        self.latest: CallPlan | None = None  # the latest call begun, in any thread
        # What was done by the calls counted so far (each call is counted when it ends).
        self.phase_calls: Counter[str] = Counter()
        self.acting_calls: Counter[str] = Counter()
        self.layer_calls: dict[str, Counter[str]] = {}
        # Calls in which every expected layer ran (computed), or a step cache skipped some (skipped).
        self.cache_calls: Counter[str] = Counter()
        self._fixed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._warned: set = set()

    def __getstate__(self) -> dict:
        # Thread-locals and locks do not copy; nor does the latest call's plan (device tensors
        # of a call that is over). The counters travel with the model.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_calls", "_lock", "latest", "_fixed", "_warned")}
        return state

    def __setstate__(self, state: dict) -> None:
        counters = {k: state.pop(k) for k in ("phase_calls", "acting_calls", "layer_calls")}
        counters["cache_calls"] = state.pop("cache_calls", Counter())  # absent from states saved before it
        self.__dict__.update(state)
        self._setup()
        self.__dict__.update(counters)

    def register(self, name: str, downsample: int) -> None:
        """Declare a patched layer and the downsampling of its level relative to the latent."""
        self.layers[name] = downsample

    def is_agent_phase(self, progress: float) -> bool:
        """Whether a call at `progress` along the trajectory (0 at the noisiest end) is in the agent phase."""
        agent_steps = self.config.agent_steps
        return agent_steps >= 1.0 or progress < agent_steps

    @property
    def call(self) -> CallPlan | None:
        """The call the current thread runs now (or ran last): what its processors act on."""
        return self._calls.call

    @property
    def view(self) -> CallPlan | None:
        """The call a report describes: the current thread's, else the latest in any thread."""
        return self._calls.call or self.latest

    # The latest call's fields, as a report reads them (see `view`).
    @property
    def plans(self) -> dict[str, LayerPlan | None]:
        return self.view.plans if self.view is not None else {}

    @property
    def latent_hw(self) -> tuple[int, int] | None:
        return self.view.latent_hw if self.view is not None else None

    @property
    def phase(self) -> str:
        """The schedule's phase of the latest call."""
        return self.view.phase if self.view is not None else TOME

    @torch.compiler.disable
    def begin_call(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        grid: tuple[int, ...] | None = None,
        sequence: Sequence | None = None,
        clock: Clock | None = None,
        layers: Collection[str] | None = None,
    ) -> CallPlan:
        """Decide the phase and every layer's plan for the model call about to run in this thread.

        Args:
            sample: the model's latent input (its batch size and device; its last two sides are
                the grid at downsample 1 unless `grid` is given).
            timestep: the call's timestep (the first one decides when there is one per sample).
            grid: the token grid at downsample 1, where it is not the latent's sides (a diffusion
                transformer's patch grid): (rows, columns), or (frames, rows, columns) of a video.
            sequence: where the grid's tokens sit in the layers' sequences, when not alone.
            clock: reads this call's progress from its timestep (the scheduler of the pipeline
                making the call); `self.clock` when None.
            layers: the layers the called model holds, where the state serves several models
                (Wan 2.2's two experts); every registered layer when None.
        """
        sequence = sequence or Sequence()
        # A call that never reached `end_call` (it raised): the layers it did not reach were not cached.
        self._count(self._calls.call, ended=False)
        frames = None
        if grid is not None and len(grid) == 3:
            frames, grid = int(grid[0]), (int(grid[1]), int(grid[2]))
        latent_hw = grid if grid is not None else (int(sample.shape[-2]), int(sample.shape[-1]))
        # The one synchronisation per UNet call when `timestep` is a device tensor.
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        clock = clock or self.clock
        self._check_timestep(t, clock)
        agent_phase = self.is_agent_phase(clock.progress(t))
        generator = torch.Generator().manual_seed((self.config.seed * 1_000_003 + round(t * 1000)) % (2**63))
        # One draw per call, from the seed and the timestep alone: every image of the batch, and
        # both halves of a guidance pair, get the same destinations whatever else is in the batch
        # (the published code turns randomness off for odd batches instead, which makes an image
        # depend on its batch size).
        randomize = self.config.use_rand
        settings = self.settings(agent_phase)
        plans, reasons = {}, {}
        for name, downsample in sorted(self.layers.items()):
            if layers is not None and name not in layers:
                continue
            if name in self.blocked:
                plans[name], reasons[name] = None, self.blocked[name]
            elif sequence.unfit is not None:
                plans[name], reasons[name] = None, sequence.unfit
            else:
                plans[name], reasons[name] = self._plan(
                    latent_hw, downsample, settings, randomize, generator, sample, frames or 1, sequence
                )
        self._send_indices([p for p in plans.values() if p is not None], sample.device)
        reasons = {n: r for n, r in reasons.items() if r is not None}
        call = CallPlan(latent_hw, agent_phase, plans, reasons, sequence, token_grid=grid is not None, frames=frames)
        call.expected = frozenset(name for name in plans if name not in self.blocked)
        self._calls.call = self.latest = call
        self._warn_if_too_small(call)
        return call

    @torch.compiler.disable
    def end_call(self) -> None:
        """Count what this thread's current call did (the UNet's forward hook calls it)."""
        self._count(self._calls.call)

    def settings(self, agent_phase: bool) -> PhaseSettings:
        c = self.config
        if agent_phase:
            return PhaseSettings(c.sx, c.sy, c.ratio, c.agent_ratio, c.st)
        return PhaseSettings(c.late_sx, c.late_sy, c.late_ratio, None, c.late_st)

    def _plan(
        self,
        latent_hw: tuple[int, int],
        downsample: int,
        s: PhaseSettings,
        randomize: bool,
        generator: torch.Generator,
        sample: torch.Tensor,
        frames: int = 1,
        sequence: Sequence | None = None,
    ) -> tuple[LayerPlan | None, str | None]:
        """A layer's plan at `downsample` (of a grid of `frames` frames, after `sequence.lead`
        tokens and before `sequence.tail`), with its positions still on the CPU when drawn; or
        None, handing its calls to the original processor, and the reason. A video shorter than
        the cells' depth gets cells as deep as the video."""
        if downsample > self.config.max_downsample:
            return None, f"downsampled {downsample}x, beyond max_downsample={self.config.max_downsample}"
        height, width = latent_hw
        h, w = -(-height // downsample), -(-width // downsample)
        f, st = frames, min(s.st, frames)
        lead, tail = (sequence.lead, sequence.tail) if sequence is not None else (0, 0)
        num_tokens = lead + f * h * w + tail
        sides = f"{h}x{w}" if frames == 1 else f"{f}x{h}x{w}"
        if num_tokens < self.config.min_tokens:
            return None, f"{SMALL_GRID} {sides} = {num_tokens} tokens < min_tokens={self.config.min_tokens}"
        if h < s.sy or w < s.sx:
            cell = f"{s.sx}x{s.sy} cell" if frames == 1 else f"{st}x{s.sy}x{s.sx} (frames x rows x columns) box"
            return None, f"{SMALL_GRID} {sides} holds no whole {cell}"
        if randomize:
            dst = destination_indices(h, w, s.sx, s.sy, generator, f, st) + lead
            src = source_indices(num_tokens, dst)
        else:
            dst, src = self._fixed_positions(h, w, s.sx, s.sy, sample.device, f, st, lead, tail)
        r = merge_count(src.numel(), num_tokens, s.ratio)
        if s.agent_ratio is not None:
            pool = self.config.agent_selection == "pool"
            r_agent = 0 if pool else merge_count(src.numel(), num_tokens, s.agent_ratio)
            num_agents = dst.numel() if pool else num_tokens - r_agent
            if 2 * num_agents < num_tokens - r:
                return LayerPlan(AGENT, h, w, s.sx, s.sy, dst, src, r, r_agent, pool, f, st, lead, tail), None
        if r == 0:
            why = f"{BY_DESIGN}: exact attention after the agent phase" if s.agent_ratio is None else "merges nothing"
            return None, why
        return LayerPlan(TOME, h, w, s.sx, s.sy, dst, src, r, 0, False, f, st, lead, tail), None

    def _fixed_positions(
        self,
        h: int,
        w: int,
        sx: int,
        sy: int,
        device: torch.device,
        frames: int = 1,
        st: int = 1,
        lead: int = 0,
        tail: int = 0,
    ) -> tuple:
        """The top-left destinations and their sources (`lead` and `tail` tokens around the grid),
        cached on `device` for later calls. Made outside inference mode: a cache filled during a
        `torch.inference_mode()` call must still serve a training step later."""
        key = (frames, h, w, st, sx, sy, lead, tail, device)
        cached = self._fixed.get(key)
        if cached is None:
            with torch.inference_mode(False):
                dst = destination_indices(h, w, sx, sy, None, frames, st) + lead
                cached = (dst.to(device), source_indices(lead + frames * h * w + tail, dst).to(device))
            self._fixed[key] = cached
        return cached

    @staticmethod
    def _send_indices(plans: list[LayerPlan], device: torch.device) -> None:
        """Move every plan's CPU positions to `device` in one copy (pinned, non-blocking on CUDA)."""
        parts = [t for p in plans for t in (p.dst, p.src) if t.device != device]
        if not parts:
            return
        flat = torch.cat(parts)
        if device.type == "cuda":
            flat = flat.pin_memory()
        on_device = iter(flat.to(device, non_blocking=True).split([t.numel() for t in parts]))
        for p in plans:
            if p.dst.device != device:
                p.dst, p.src = next(on_device), next(on_device)

    @torch.compiler.disable
    def hand_over(self, call: CallPlan, name: str, reason: str) -> None:
        """Record that a planned layer's call went to the original processor at run time."""
        if (name, reason) not in self._warned:
            self._warned.add((name, reason))
            logger.warning("agentsd: %s ran exact attention instead of its plan: %s.", name, reason)
        call.handed_over[name] = reason

    def latest_modes(self) -> dict[str, str]:
        """What each patched layer did in the latest call: agent, tome or exact."""
        return self.view.modes() if self.view is not None else {}

    def counts(self) -> tuple[Counter[str], Counter[str], dict[str, Counter[str]], Counter[str]]:
        """UNet calls per phase, calls in which some layer ran each mode, per layer the calls per
        mode (`CACHED` where a step cache skipped its block), and the calls computed and skipped
        (some layer's block cached), since patching (the latest call included, if it is still
        running: as computed, since its layers may yet run)."""
        with self._lock:
            phases, acting = Counter(self.phase_calls), Counter(self.acting_calls)
            layers = {name: Counter(c) for name, c in self.layer_calls.items()}
            cache = Counter(self.cache_calls)
        for call in {id(c): c for c in (self.latest, self._calls.call) if c is not None}.values():
            if not call.counted:
                _add(call, phases, acting, layers, cache, ended=False)
        return phases, acting, layers, cache

    def _count(self, call: CallPlan | None, ended: bool = True) -> None:
        with self._lock:
            if call is not None and not call.counted:
                _add(call, self.phase_calls, self.acting_calls, self.layer_calls, self.cache_calls, ended)
                call.counted = True

    def _check_timestep(self, t: float, clock: Clock) -> None:
        """Say once when the timestep is one the clock cannot place (the phase would be wrong)."""
        if clock.maps(t) or "timestep" in self._warned:
            return
        self._warned.add("timestep")
        logger.warning(
            "agentsd: the UNet got timestep %g, outside [0, %d]: it cannot tell how far along the trajectory "
            "this call is, so the phase schedule may be wrong. Call the model through its pipeline, whose "
            "scheduler agentsd then reads, or patch the pipeline (agentsd.patch(pipe)) for calls made outside it "
            "to read that pipeline's scheduler.",
            t,
            getattr(clock, "num_train_timesteps", 0),
        )

    def _warn_if_too_small(self, call: CallPlan) -> None:
        """Warn once per size when every layer runs exact attention because of its size."""
        limited = [r for r in call.reasons.values() if r.startswith(SMALL_GRID)]
        if call.plans and not any(call.plans.values()) and limited and call.sides not in self._warned:
            self._warned.add(call.sides)
            logger.warning(
                "agentsd: no patched layer runs agent attention or token merging at this size (%s): "
                "%s. Use a larger image or a lower min_tokens.",
                call.size,
                limited[0],
            )


def _add(
    call: CallPlan, phases: Counter, acting: Counter, layers: dict[str, Counter], cache: Counter, ended: bool = True
) -> None:
    """Add one call to the counters. The phase is the schedule's whether or not a cache skipped
    blocks; a layer whose block was skipped counts as `CACHED`, not as its planned mode."""
    modes = call.outcomes(ended)
    phases[call.phase] += 1
    acting.update(set(modes.values()) - {EXACT, CACHED})
    cache[SKIPPED if CACHED in modes.values() else COMPUTED] += 1
    for name, mode in modes.items():
        layers.setdefault(name, Counter())[mode] += 1
