"""The scheduler steps of a pipeline call, from its model calls: what `generate` reports and records
per step.

A pipeline's loop makes one iteration per entry of `scheduler.timesteps`, and each iteration the
same number of model calls (two with Flux's true CFG, which runs the negative prompt separately).
An iteration is not always a step: a second-order scheduler (Heun, KDPM2) evaluates the model
twice per step, each evaluation an iteration of its own, and PNDM's PLMS makes an extra first
evaluation. diffusers' pipelines say where a step ends when they advance their progress bar; this
reads the iterations the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def step_phases(call_phases: Sequence[str], scheduler: Any, steps: int) -> list[str]:
    """The phase of each of the `steps` scheduler steps of a pipeline call that just ran with
    `scheduler`, given the phase of each of its model calls (`status.recording_phases`).

    A step takes the phase of its first model call, the one at the step's own timestep (a Heun
    step's second evaluation is at the next step's timestep). Iteration `i` of `n` ends a step
    where diffusers' pipelines advance their progress bar: the last iteration, and past the
    `n - steps * order` extra first ones, every `order`-th.
    """
    iterations = len(scheduler.timesteps)
    calls = len(call_phases) // iterations  # per iteration
    extra, order = max(iterations - steps * scheduler.order, 0), scheduler.order
    phases, first = [], 0
    for i in range(iterations):
        if i == iterations - 1 or (i + 1 > extra and (i + 1) % order == 0):
            phases.append(call_phases[first * calls])
            first = i + 1
    return phases
