"""`agentsd generate` says and records one phase per scheduler step, the steps asked for, even where
a step is more than one model call: a second-order scheduler's two evaluations, PNDM's extra
first one, Flux's true CFG (in test_cli_flux.py)."""

import json

import pytest
import torch
from cli_run import run_main

from agentsd.api.presets import load_preset
from agentsd.testing import tiny_pipeline


def expected_phases(scheduler, steps, agent_steps):
    """A step's phase is that of its own timestep (its first model call): the timesteps of the
    steps are the scheduler's with the repeats of a second evaluation made once."""
    scheduler.set_timesteps(steps)
    own = torch.unique_consecutive(scheduler.timesteps)
    assert len(own) == steps
    return ["agent" if 1 - float(t) / scheduler.config.num_train_timesteps < agent_steps else "tome" for t in own]


def describe(phases):
    agent = phases.count("agent")
    assert 0 < agent < len(phases)
    last = len(phases)
    agent_part = "1" if agent == 1 else f"1-{agent}"
    tome_part = f"{last}" if agent + 1 == last else f"{agent + 1}-{last}"
    return f"agentsd steps: {agent_part} agent attention, {tome_part} token merging"


@pytest.mark.parametrize(
    "kind, scheduler, steps, calls",
    [("sd3", "flow-heun", 3, 5), ("sd15", "pndm", 5, 6)],
    ids=["heun-sd3", "pndm-sd15"],
)
def test_steps_are_the_schedulers_not_the_model_calls(tmp_path, capsys, kind, scheduler, steps, calls):
    """FlowMatchHeun: 3 steps are 5 transformer calls (two evaluations a step, one for the last);
    PNDM (PLMS): 5 steps are 6 UNet calls. The step line and the sidecar count the steps."""
    if kind == "sd3":
        pytest.importorskip("agentsd.testing.tiny_dit", reason="this diffusers has no SD3")
    model = tmp_path / kind
    pipe = tiny_pipeline(kind)
    pipe.save_pretrained(model)
    from agentsd.cli.schedulers import set_scheduler

    set_scheduler(pipe, scheduler)
    preset = load_preset("sd3" if kind == "sd3" else "paper")
    phases = expected_phases(pipe.scheduler, steps, preset.agent_steps)
    code, printed, errors = run_main(
        capsys, "generate", "--model", model, "--prompt", "x", "--scheduler", scheduler, "--steps", steps,
        *(["--max-sequence-length", "8"] if kind == "sd3" else []), "--out", tmp_path / "out",
    )  # fmt: skip
    assert code == 0, errors
    assert f"agentsd: {calls} {'transformer' if kind == 'sd3' else 'UNet'} calls" in printed
    assert describe(phases) in printed
    assert json.loads((tmp_path / "out" / "p0000_s0.json").read_text())["agentsd_phases"] == phases
