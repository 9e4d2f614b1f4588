"""The run-time state of one patched UNet: the phase and every layer's plan, decided per call.

Host-device traffic, on a GPU: `begin_call` runs once per UNet call, in the UNet's forward
pre-hook, outside any compiled graph. It reads the timestep as a Python number (the one
host-device synchronisation agentsd adds to a UNet call, when the pipeline passes the timestep
as a device tensor) and sends the destination and source positions of every patched layer to
the device in a single non-blocking copy from pinned memory. The processors themselves never
synchronise: they look their plan up and launch kernels.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch

from .config import AgentSDConfig
from .merge import TokenMerge, destination_indices, merge_count, source_indices

logger = logging.getLogger(__name__)

AGENT = "agent"
TOME = "tome"
EXACT = "exact"

# Why a layer runs exact attention in a call (the first word of the reason it reports).
SMALL_GRID = "grid"  # fewer tokens than min_tokens, or no whole cell: the image is too small there
BY_DESIGN = "late_ratio=0"  # the ToMe phase merges nothing: exact attention is the setting


@dataclass(frozen=True)
class PhaseSettings:
    """Merge settings of one phase; `agent_ratio` is None in the ToMe-only phase."""

    sx: int
    sy: int
    ratio: float
    agent_ratio: float | None


@dataclass
class LayerPlan:
    """What one layer does in the current UNet call: the mode, the grid and its cells, the
    destination and source positions, the merge sizes (`r` ToMe-merged, `r_agent` merged into
    agents) and whether the agents are cell means (`pool`) rather than a merge."""

    mode: str
    h: int
    w: int
    sx: int
    sy: int
    dst: torch.Tensor
    src: torch.Tensor
    r: int
    r_agent: int
    pool: bool = False

    @property
    def matches(self) -> bool:
        """Whether this plan needs the bipartite matching (a merge, or agents by merging)."""
        return self.r > 0 or (self.mode == AGENT and not self.pool)

    @property
    def merged_tokens(self) -> int:
        """N': the tokens attention runs over after the ToMe merge."""
        return self.h * self.w - self.r

    @property
    def agents(self) -> int | None:
        """n: the agent count in the agent mode, else None."""
        if self.mode != AGENT:
            return None
        return self.dst.numel() if self.pool else self.h * self.w - self.r_agent


class AgentSDState:
    """Run-time state shared by every patched layer of one UNet.

    The UNet's forward pre-hook calls `begin_call` with the latent and the timestep. Every
    decision that depends only on them (the phase, each layer's grid, its destination draw
    and merge sizes) is made there, once per UNet call, outside any compiled graph; the
    processors only look their plan up. Nothing else carries over between UNet calls but
    counters of what was done: the generator is reseeded from `config.seed` and the timestep,
    so a pipeline call is reproducible.

    Args:
        config: the agent-attention configuration.
        num_train_timesteps: the scheduler's T; the phase is decided by `1 - t / T`.
    """

    def __init__(self, config: AgentSDConfig, num_train_timesteps: int = 1000):
        self.config = config
        self.num_train_timesteps = num_train_timesteps
        self.latent_hw: tuple[int, int] | None = None
        self.agent_phase = False
        self.generator = torch.Generator()
        self.layers: dict[str, int] = {}
        self.plans: dict[str, LayerPlan | None] = {}
        # Why each layer without a plan runs exact attention in the latest call.
        self.reasons: dict[str, str] = {}
        # Layers agentsd cannot act on (set by the patch), and why.
        self.blocked: dict[str, str] = {}
        # Layers whose call in the latest UNet call was handed over at run time, and why.
        self.handed_over: dict[str, str] = {}
        # What was done since patching, up to the latest call (which `counts` adds).
        self.phase_calls: Counter[str] = Counter()
        self.acting_calls: Counter[str] = Counter()
        self.layer_calls: dict[str, Counter[str]] = {}
        # With `share_matching`: the merges of each grid in the current UNet call.
        self.shared: dict[tuple[int, int], tuple[TokenMerge | None, TokenMerge | None]] = {}
        self._fixed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._warned: set = set()

    def register(self, name: str, downsample: int) -> None:
        """Declare a patched layer and the downsampling of its level relative to the latent."""
        self.layers[name] = downsample

    def progress(self, timestep: float) -> float:
        return 1.0 - timestep / self.num_train_timesteps

    def is_agent_phase(self, timestep: float) -> bool:
        agent_steps = self.config.agent_steps
        return agent_steps >= 1.0 or self.progress(timestep) < agent_steps

    @property
    def phase(self) -> str:
        """The schedule's phase of the latest call."""
        return AGENT if self.agent_phase else TOME

    @torch.compiler.disable
    def begin_call(self, sample: torch.Tensor, timestep: torch.Tensor | float) -> None:
        """Decide the phase and every layer's plan for the UNet call about to run."""
        self._fold_latest_call()
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        # The one synchronisation per UNet call when `timestep` is a device tensor.
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        self.agent_phase = self.is_agent_phase(t)
        self.generator.manual_seed((self.config.seed * 1_000_003 + round(t * 1000)) % (2**63))
        randomize = self.config.use_rand and sample.shape[0] % 2 == 0
        self.shared.clear()
        self.handed_over = {}
        plans, reasons = {}, {}
        for name, downsample in sorted(self.layers.items()):
            if name in self.blocked:
                plans[name], reasons[name] = None, self.blocked[name]
            else:
                plans[name], reasons[name] = self._plan(downsample, randomize, sample.device)
        self._send_indices([p for p in plans.values() if p is not None], sample.device)
        self.plans, self.reasons = plans, {n: r for n, r in reasons.items() if r is not None}
        self._warn_if_too_small()

    @property
    def settings(self) -> PhaseSettings:
        c = self.config
        if self.agent_phase:
            return PhaseSettings(c.sx, c.sy, c.ratio, c.agent_ratio)
        return PhaseSettings(c.late_sx, c.late_sy, c.late_ratio, None)

    def _plan(self, downsample: int, randomize: bool, device: torch.device) -> tuple[LayerPlan | None, str | None]:
        """A layer's plan at `downsample`, with its positions still on the CPU when drawn; or
        None, handing its calls to the original processor, and the reason."""
        if downsample > self.config.max_downsample:
            return None, f"downsampled {downsample}x, beyond max_downsample={self.config.max_downsample}"
        height, width = self.latent_hw
        h, w = -(-height // downsample), -(-width // downsample)
        num_tokens = h * w
        if num_tokens < self.config.min_tokens:
            return None, f"{SMALL_GRID} {h}x{w} = {num_tokens} tokens < min_tokens={self.config.min_tokens}"
        s = self.settings
        if h < s.sy or w < s.sx:
            return None, f"{SMALL_GRID} {h}x{w} holds no whole {s.sx}x{s.sy} cell"
        dst, src = self.destinations(h, w, s.sx, s.sy, randomize, device)
        r = merge_count(src.numel(), num_tokens, s.ratio)
        if s.agent_ratio is not None:
            pool = self.config.agent_selection == "pool"
            r_agent = 0 if pool else merge_count(src.numel(), num_tokens, s.agent_ratio)
            num_agents = dst.numel() if pool else num_tokens - r_agent
            if 2 * num_agents < num_tokens - r:
                return LayerPlan(AGENT, h, w, s.sx, s.sy, dst, src, r, r_agent, pool), None
        if r == 0:
            why = f"{BY_DESIGN}: exact attention after the agent phase" if s.agent_ratio is None else "merges nothing"
            return None, why
        return LayerPlan(TOME, h, w, s.sx, s.sy, dst, src, r, 0), None

    def destinations(
        self, h: int, w: int, sx: int, sy: int, randomize: bool, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Destination and source positions: drawn anew on the CPU when `randomize` (`begin_call`
        sends them to `device`), else the fixed top-left ones, cached on `device`."""
        if randomize:
            dst = destination_indices(h, w, sx, sy, self.generator)
            return dst, source_indices(h * w, dst)
        key = (h, w, sx, sy, device)
        if key not in self._fixed:
            dst = destination_indices(h, w, sx, sy)
            self._fixed[key] = (dst.to(device), source_indices(h * w, dst).to(device))
        return self._fixed[key]

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
    def hand_over(self, name: str, reason: str) -> None:
        """Record that a planned layer's call went to the original processor at run time."""
        if (name, reason) not in self._warned:
            self._warned.add((name, reason))
            logger.warning("agentsd: %s ran exact attention instead of its plan: %s.", name, reason)
        self.handed_over[name] = reason

    def latest_modes(self) -> dict[str, str]:
        """What each patched layer did in the latest call: agent, tome or exact."""
        return {
            name: EXACT if plan is None or name in self.handed_over else plan.mode for name, plan in self.plans.items()
        }

    def counts(self) -> tuple[Counter[str], Counter[str], dict[str, Counter[str]]]:
        """UNet calls per phase, calls in which some layer ran each mode, and per layer the calls
        per mode, since patching (the latest call included)."""
        phases, acting = Counter(self.phase_calls), Counter(self.acting_calls)
        layers = {name: Counter(c) for name, c in self.layer_calls.items()}
        if self.latent_hw is not None:
            self._add_latest(phases, acting, layers)
        return phases, acting, layers

    def _add_latest(self, phases: Counter, acting: Counter, layers: dict[str, Counter]) -> None:
        modes = self.latest_modes()
        phases[self.phase] += 1
        acting.update(set(modes.values()) - {EXACT})
        for name, mode in modes.items():
            layers.setdefault(name, Counter())[mode] += 1

    def _fold_latest_call(self) -> None:
        if self.latent_hw is not None:
            self._add_latest(self.phase_calls, self.acting_calls, self.layer_calls)

    def _warn_if_too_small(self) -> None:
        """Warn once per latent size when every layer runs exact attention because of its size."""
        limited = [r for r in self.reasons.values() if r.startswith(SMALL_GRID)]
        if self.plans and not any(self.plans.values()) and limited and self.latent_hw not in self._warned:
            self._warned.add(self.latent_hw)
            h, w = self.latent_hw
            logger.warning(
                "agentsd: no patched layer runs agent attention or token merging at this size (latent %dx%d): "
                "%s. Use a larger image or a lower min_tokens.",
                h,
                w,
                limited[0],
            )
