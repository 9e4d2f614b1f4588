"""What the README says about the API is what it does."""

from pathlib import Path

import torch

import agentsd
from agentsd.api.status import recording_phases
from agentsd.testing import tiny_pipeline

README = Path(__file__).resolve().parents[1] / "README.md"


def api_row(name: str) -> str:
    (row,) = [line for line in README.read_text().splitlines() if line.startswith(f"| `agentsd.{name}(")]
    return row


def test_current_phase_in_a_step_end_callback_is_the_phase_of_the_step_just_run():
    pipe = tiny_pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append(agentsd.current_phase(pipe))
        return kwargs

    with agentsd.patched(pipe), recording_phases(pipe) as phases:
        pipe("x", num_inference_steps=5, callback_on_step_end=callback, generator=torch.Generator().manual_seed(0))
    assert seen == phases and {"agent", "tome"} <= set(seen)
    row = api_row("current_phase")
    assert "in a `callback_on_step_end`, the phase of the step just run" in row
    assert "None otherwise (e.g. in `callback_on_step_end`)" not in row
