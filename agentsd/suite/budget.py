"""The time budget of a suite run: an estimate before each scenario, from rates the run measured.

A scenario's cost is a count of units of a few kinds (`Cost`, written by `estimate.py`):

    flop        FLOPs of the timed calls (UNet steps; VAE and text encoder in the pipeline)
    call        model calls (kernel-launch overhead)
    build:ARCH  building the random-weight model of ARCH
    compile     whole-UNet torch.compile compilations
    timing      `torch.utils.benchmark` timings of the breakeven grids
    seconds     fixed seconds (the pytest subprocess of the tests scenarios)

The estimate is the sum of units x seconds per unit. The rates start at the priors of
`estimate.py` and are replaced by what the run measures:

    flop        the latest baseline's median seconds per call over the FLOPs of that call; the
                launch overhead is then part of it (the `call` rate becomes 0)
    build:ARCH  how long the model cache took to build ARCH
    compile, timing
                what a scenario with such units took beyond its other units, per unit

A scenario runs only when its estimate fits in the time left; otherwise it is skipped with
both numbers and what the estimate is made of.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Cost = dict[str, float]
# Kinds calibrated from a scenario's time beyond its other units.
RESIDUAL_KINDS = ("compile", "timing")


@dataclass(frozen=True)
class Decision:
    """Whether a scenario runs: its estimate, the time left then, and why when it does not."""

    runs: bool
    estimate_s: float
    left_s: float
    reason: str = ""


class Budget:
    """Seconds left of `total_s` and the rates the estimates use.

    Args:
        total_s: the budget in seconds, counted from construction.
        priors: seconds per unit of each kind before anything is measured.
        clock: monotonic seconds (a fake one in tests).
    """

    def __init__(self, total_s: float, priors: Mapping[str, float], clock: Callable[[], float] = time.monotonic):
        if total_s <= 0:
            raise ValueError(f"the budget must be positive seconds, got {total_s}: pass --budget SECONDS.")
        self.total_s, self.clock = float(total_s), clock
        self.rates = dict(priors)
        self.measured: set[str] = set()
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def _rate(self, kind: str) -> float:
        if kind not in self.rates:
            raise KeyError(f"no prior for cost kind {kind!r}: add it to the priors in agentsd/suite/estimate.py.")
        return self.rates[kind]

    def estimate(self, cost: Cost) -> float:
        """Seconds `cost` takes at the current rates."""
        return sum(units * self._rate(kind) for kind, units in cost.items())

    def describe(self, cost: Cost) -> str:
        """What the estimate is made of, largest term first, each rate marked measured or prior."""
        terms = sorted(((units * self._rate(kind), kind, units) for kind, units in cost.items()), reverse=True)
        parts = []
        for seconds, kind, units in terms:
            if seconds <= 0:
                continue
            source = "measured" if kind in self.measured else "prior"
            rate = self.rates[kind]
            if kind == "flop":
                parts.append(f"{_number(units / 1e12)} TFLOP at {_number(1 / rate / 1e12)} TFLOP/s ({source})")
            elif kind == "call":
                parts.append(f"{units:.0f} calls x {rate * 1000:.0f} ms ({source})")
            elif kind == "seconds":
                parts.append(f"{units:.0f} s fixed ({source})")
            else:
                parts.append(f"{units:g} {kind} x {rate:.1f} s ({source})")
        return ", ".join(parts) or "nothing"

    def decide(self, cost: Cost) -> Decision:
        """Run when the estimate fits in the time left; else skip, saying both and why."""
        estimate, left = self.estimate(cost), self.left()
        if estimate <= left:
            return Decision(True, estimate, left)
        reason = (f"estimated {estimate:.0f} s ({self.describe(cost)}) > {max(left, 0):.0f} s left of the "
                  f"{self.total_s:.0f} s budget")  # fmt: skip
        return Decision(False, estimate, left, reason)

    def measure(self, kind: str, seconds_per_unit: float) -> None:
        """Replace a prior (or an earlier measurement) by a measured rate."""
        self.rates[kind] = seconds_per_unit
        self.measured.add(kind)
        if kind == "flop":  # a measured call time includes its launches
            self.rates["call"] = 0.0
            self.measured.add("call")

    def settle(self, cost: Cost, elapsed_s: float) -> None:
        """After a scenario: rate its one residual kind (compile, timing) from what the scenario
        took beyond its other units at the rates measured so far."""
        residual = [kind for kind in RESIDUAL_KINDS if cost.get(kind)]
        if len(residual) != 1:
            return
        kind = residual[0]
        others = self.estimate({k: u for k, u in cost.items() if k != kind})
        self.measure(kind, max(elapsed_s - others, 0.0) / cost[kind])


def _number(value: float) -> str:
    return f"{value:,.1f}" if value >= 0.1 else f"{value:.1e}"
