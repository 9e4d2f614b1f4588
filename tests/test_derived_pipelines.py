"""Pipelines made from a patched one (`from_pipe`, `Pipeline(**components)`) share its model but
not its scheduler: each call's phase follows the scheduler of the pipeline making it, one
pipeline after the other and at the same time, and a call whose scheduler cannot be known says so.

The expected phases are computed here from each scheduler's own kind: training timesteps
(DDIM) are in the agent phase while 1 - t / 1000 < 0.4; noise levels (EDM) while the step's
place on the schedule, i / (steps - 1), is."""

import threading

import pytest
import torch
from diffusers import DDIMScheduler, EDMEulerScheduler, StableDiffusionPipeline

import agentsd
from agentsd.testing import tiny_pipeline

STEPS = 10
SCHEDULERS = {"ddim": DDIMScheduler, "edm": EDMEulerScheduler}


def expected(kind, timesteps):
    if kind == "edm":
        return ["agent" if i / (len(timesteps) - 1) < 0.4 else "tome" for i in range(len(timesteps))]
    return ["agent" if 1 - t / 1000 < 0.4 else "tome" for t in timesteps]


def run(pipe, barrier=None):
    """The timestep and phase of every step of a run (the phase read in the step's callback:
    the calling thread's latest UNet call); with `barrier`, each step waits for the other run."""
    timesteps, phases = [], []

    def step_end(p, i, t, kwargs):
        timesteps.append(float(t))
        phases.append(agentsd.current_phase(p))
        if barrier is not None:
            barrier.wait(timeout=60)
        return kwargs

    pipe.set_progress_bar_config(disable=True)
    pipe(
        "a cube",
        num_inference_steps=STEPS,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=step_end,
    )
    return timesteps, phases


def derive(pipe, how, scheduler):
    if how == "from_pipe":
        return StableDiffusionPipeline.from_pipe(pipe, scheduler=scheduler)
    return type(pipe)(**{**pipe.components, "scheduler": scheduler})


@pytest.mark.parametrize("how", ["from_pipe", "components"])
@pytest.mark.parametrize("first, second", [("ddim", "edm"), ("edm", "ddim")])
def test_a_derived_pipeline_follows_its_own_scheduler(first, second, how):
    pipe = tiny_pipeline("sd15")
    pipe.scheduler = SCHEDULERS[first]()
    agentsd.patch(pipe, min_tokens=0)
    other = derive(pipe, how, SCHEDULERS[second]())
    assert other.unet is pipe.unet
    timesteps, phases = run(other)
    assert phases == expected(second, timesteps)
    assert "agent" in phases and "tome" in phases
    timesteps, phases = run(pipe)  # the patched pipeline keeps its own
    assert phases == expected(first, timesteps)


def test_pipelines_with_different_schedulers_at_the_same_time():
    """Two threads in lock step, one step each in turn, one DDIM and one EDM pipeline sharing the UNet."""
    pipe = tiny_pipeline("sd15")
    agentsd.patch(pipe, min_tokens=0)
    pipes = {"ddim": derive(pipe, "from_pipe", DDIMScheduler()), "edm": derive(pipe, "from_pipe", EDMEulerScheduler())}
    barrier, results = threading.Barrier(2), {}

    def worker(kind):
        results[kind] = run(pipes[kind], barrier)

    threads = [threading.Thread(target=worker, args=(kind,)) for kind in pipes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    for kind, (timesteps, phases) in results.items():
        assert phases == expected(kind, timesteps), kind
    assert set(results) == {"ddim", "edm"}


def test_a_patched_unet_follows_the_pipeline_that_calls_it(caplog):
    """Patched as a bare UNet, it still reads the scheduler of the pipeline calling it."""
    pipe = tiny_pipeline("sd15")
    pipe.scheduler = EDMEulerScheduler()
    agentsd.patch(pipe.unet, min_tokens=0)
    with caplog.at_level("WARNING", logger="agentsd"):
        timesteps, phases = run(pipe)
    assert phases == expected("edm", timesteps)
    assert not [r for r in caplog.records if "outside [0, 1000]" in r.getMessage()]


def test_a_call_outside_any_pipeline_says_which_scheduler_it_assumes(caplog):
    pipe = tiny_pipeline("sd15")
    agentsd.patch(pipe, min_tokens=0)
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad(), caplog.at_level("WARNING", logger="agentsd"):
        pipe.unet(sample, torch.tensor(981), encoder_hidden_states=context)  # one scheduler seen: no doubt
        assert not [r for r in caplog.records if "outside a pipeline" in r.getMessage()]
        run(derive(pipe, "from_pipe", EDMEulerScheduler()))
        for _ in range(2):
            pipe.unet(sample, torch.tensor(981), encoder_hidden_states=context)
    said = [r.getMessage() for r in caplog.records if "outside a pipeline" in r.getMessage()]
    assert len(said) == 1
    assert "EDMEulerScheduler" in said[0] and "as DDIMScheduler's, the scheduler of the pipeline patched" in said[0]
    assert agentsd.current_phase(pipe) == "agent"  # read as DDIM's: 1 - 981 / 1000 < 0.4
