"""How far along the denoising trajectory a UNet call is, read from the timestep it receives.

The phase schedule (`AgentSDConfig.agent_steps`) is a fraction of the trajectory from its
noisiest end. Schedulers hand the UNet two kinds of timestep:

- **Training timesteps** (DDIM, PNDM, DPM-Solver, Euler, UniPC, LCM, ... and their Karras
  variants, which map each sigma back to a training timestep): a number in [0, T]. Progress is
  `1 - t / T`, so the published switch (step 20 of 50) holds for every such sampler.
- **Noise levels** (the EDM schedulers of Playground v2.5, `EulerDiscreteScheduler` with
  `timestep_type="continuous"`): a function of sigma such as `0.25 * log(sigma)`, which is not
  in [0, T] at all. Progress is the position of that noise level along the scheduler's own
  schedule from its largest sigma to its smallest, read off a fine copy of that schedule
  (`Timeline`): the step fraction of a full-length run of that scheduler.

A patched pipeline tells agentsd its scheduler; a bare UNet gets training timesteps with
T = 1000, and a timestep outside [0, T] is reported once (it cannot be mapped).
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
# Steps of the fine schedule that a noise-level timestep is placed on.
TIMELINE_STEPS = 1000


@dataclass(frozen=True)
class TrainingTimesteps:
    """Timesteps in [0, T]: progress `1 - t / T`.

    Args:
        num_train_timesteps: the scheduler's T.
    """

    num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS

    def progress(self, timestep: float) -> float:
        return 1.0 - timestep / self.num_train_timesteps

    def maps(self, timestep: float) -> bool:
        """Whether `timestep` is one this clock can place (it lies in [0, T])."""
        return 0.0 <= timestep <= self.num_train_timesteps


@dataclass(frozen=True)
class Timeline:
    """Noise-level timesteps: progress is where a timestep falls on the scheduler's own fine
    schedule, whose timesteps go monotonically from the noisiest (progress 0) to the cleanest
    (progress 1). Values beyond either end count as that end.

    Args:
        timesteps: the fine schedule's timesteps, noisiest first.
        scheduler: the scheduler class it was read from (for messages).
    """

    timesteps: tuple[float, ...]
    scheduler: str = ""

    def progress(self, timestep: float) -> float:
        values = self.timesteps
        last = len(values) - 1
        # bisect needs increasing values: walk the schedule in the order its values increase.
        increasing = values[0] < values[-1]
        ordered = values if increasing else values[::-1]
        i = bisect.bisect_left(ordered, timestep)
        if i == 0:
            position = 0.0
        elif i > last:
            position = float(last)
        else:
            low, high = ordered[i - 1], ordered[i]
            position = i - 1 + (timestep - low) / (high - low) if high != low else float(i)
        position = position if increasing else last - position
        return min(max(position / last, 0.0), 1.0)

    def maps(self, timestep: float) -> bool:
        return True


Clock = TrainingTimesteps | Timeline


def uses_noise_levels(scheduler: Any) -> bool:
    """Whether `scheduler` hands the UNet noise levels rather than training timesteps: the
    EDM-style schedulers (they precondition sigma into the UNet's timestep), and Euler's
    continuous mode (which passes `0.25 * log(sigma)` with v-prediction)."""
    if callable(getattr(scheduler, "precondition_noise", None)):
        return True
    config = getattr(scheduler, "config", {})
    return config.get("timestep_type") == "continuous" and config.get("prediction_type") == "v_prediction"


def clock_for(scheduler: Any) -> Clock:
    """The clock that reads `scheduler`'s timesteps (training timesteps when it has no config)."""
    config = getattr(scheduler, "config", None)
    if config is None:
        return TrainingTimesteps()
    if not uses_noise_levels(scheduler):
        return TrainingTimesteps(int(config.get("num_train_timesteps") or DEFAULT_NUM_TRAIN_TIMESTEPS))
    # A fresh scheduler of the same class and config, so the user's own keeps its state.
    fine = type(scheduler).from_config(config)
    fine.set_timesteps(TIMELINE_STEPS, device="cpu")
    return Timeline(tuple(float(t) for t in fine.timesteps.flatten()), type(scheduler).__name__)


class ClockCache:
    """`clock_for` of a scheduler, built once per scheduler class and config: a pipeline's
    scheduler may be swapped at any time, and pipelines with different schedulers may share one
    model. Keeps the latest `MAX_CLOCKS` of them."""

    MAX_CLOCKS = 16

    def __init__(self) -> None:
        self._clocks: dict[tuple, tuple[str, Clock]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"_clocks": self._clocks}  # a lock does not copy

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self._clocks.update(state["_clocks"])

    def __call__(self, scheduler: Any) -> Clock:
        config = getattr(scheduler, "config", None)
        key = (type(scheduler), tuple(sorted((k, repr(v)) for k, v in dict(config or {}).items())))
        with self._lock:
            found = self._clocks.pop(key, None)  # popped and put back: the dict's order is the use order
            if found is None:
                found = (type(scheduler).__name__, clock_for(scheduler))
            self._clocks[key] = found
            while len(self._clocks) > self.MAX_CLOCKS:
                self._clocks.pop(next(iter(self._clocks)))
        return found[1]

    def schedulers_other_than(self, clock: Clock) -> list[str]:
        """The scheduler classes read so far whose clock is not `clock`."""
        with self._lock:
            return sorted({name for name, seen in self._clocks.values() if seen != clock})
