"""The agent/ToMe phase switch over real scheduler runs, counted per layer and step."""

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from diffusers.utils import OptionalDependencyNotAvailable

import agentsd
from agentsd.processors.self_attention import AgentSDProcessor
from agentsd.testing import tiny_pipeline

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def record_run(pipe, steps, monkeypatch, **patch_args):
    """Run the pipeline patched; return the timestep of every UNet call and, per call,
    what each patched layer did ('agent', 'tome', or None for handed to the original)."""
    agentsd.patch(pipe, **patch_args)
    calls = []
    pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((float(args[1]), {})), with_kwargs=True
    )
    original_plan = AgentSDProcessor.plan

    def plan(self, attn, hidden_states, *args):
        result = original_plan(self, attn, hidden_states, *args)
        calls[-1][1].setdefault(self.name, []).append(None if result is None else result.mode)
        return result

    monkeypatch.setattr(AgentSDProcessor, "plan", plan)
    pipe.set_progress_bar_config(disable=True)
    pipe(
        "a cube",
        num_inference_steps=steps,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    return calls


def patched_layers(pipe):
    return {n for n, p in pipe.unet.attn_processors.items() if isinstance(p, AgentSDProcessor)}


@pytest.mark.parametrize(
    "scheduler",
    [
        DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False),
        PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True),
    ],
    ids=["ddim", "pndm"],
)
def test_published_schedule_agent_for_steps_0_to_19_then_tome(scheduler, monkeypatch):
    pipe = tiny_pipeline("sd15")
    pipe.scheduler = scheduler
    calls = record_run(pipe, 50, monkeypatch)
    layers = patched_layers(pipe)
    assert len(layers) == 3
    modes_by_step = {}
    for t, per_layer in calls:
        assert set(per_layer) == layers  # every patched layer, and only those, once per call
        assert all(len(modes) == 1 for modes in per_layer.values())
        modes = {m[0] for m in per_layer.values()}
        assert len(modes) == 1
        modes_by_step.setdefault(t, set()).update(modes)
    # SD's 50-step schedule visits t_i = 981 - 20 i (PNDM runs its first step twice).
    assert sorted(modes_by_step, reverse=True) == [981 - 20 * i for i in range(50)]
    for i in range(50):
        assert modes_by_step[981 - 20 * i] == ({"agent"} if i < 20 else {"tome"}), i
    expected_calls = 51 if isinstance(scheduler, PNDMScheduler) else 50
    assert len(calls) == expected_calls


def test_agent_steps_1_and_0(monkeypatch):
    pipe = tiny_pipeline("sd15")
    always = record_run(pipe, 10, monkeypatch, agent_steps=1.0)
    assert {m for _, layer in always for modes in layer.values() for m in modes} == {"agent"}
    never = record_run(tiny_pipeline("sd15"), 10, monkeypatch, agent_steps=0.0, late_ratio=0.0)
    assert {m for _, layer in never for modes in layer.values() for m in modes} == {None}


def test_phase_uses_the_schedulers_num_train_timesteps(monkeypatch):
    pipe = tiny_pipeline("sd15")
    pipe.scheduler = DDIMScheduler(num_train_timesteps=500, clip_sample=False)
    calls = record_run(pipe, 10, monkeypatch, agent_steps=0.5)
    for t, layer in calls:
        expected = "agent" if 1 - t / 500 < 0.5 else "tome"
        assert {m for modes in layer.values() for m in modes} == {expected}, t


@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "euler-a", "dpm++2m", "dpm++2m-karras", "unipc", "lcm"])
def test_every_scheduler_switches_at_the_same_point_of_the_trajectory(name, monkeypatch):
    from agentsd.cli.generation import SCHEDULERS, set_scheduler

    class_name = SCHEDULERS[name][0]
    if not hasattr(diffusers, class_name):
        pytest.skip(f"diffusers {diffusers.__version__} has no {class_name}")
    pipe = tiny_pipeline("sd15")
    set_scheduler(pipe, name)
    calls = record_run(pipe, 12, monkeypatch)
    phases = [{m for modes in layer.values() for m in modes} for _, layer in calls]
    assert all(len(p) == 1 for p in phases)
    phases = [p.pop() for p in phases]
    # Agent while 1 - t/T < 0.4, whatever the sampler's spacing: all agent calls come first.
    assert phases == ["agent" if 1 - t / 1000 < 0.4 else "tome" for t, _ in calls]
    assert phases[0] == "agent" and phases[-1] == "tome"
    assert phases == sorted(phases)  # "agent" < "tome": one switch, never back


# Every scheduler the SD / SDXL pipelines take: the Karras family they are typed with, the EDM
# scheduler of Playground v2.5 (an SDXL pipeline), the few-step LCM and TCD, and Euler's continuous
# mode. Those marked NOISE_LEVEL hand the UNet a function of sigma (0.25 log sigma), not a training
# timestep: their progress is the step's position on their own schedule, i / (N - 1).
def _scheduler_cases():
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

    names = [e.name for e in KarrasDiffusionSchedulers] + [
        "EDMDPMSolverMultistepScheduler",
        "LCMScheduler",
        "TCDScheduler",
    ]
    cases = [pytest.param(name, {}, id=name) for name in dict.fromkeys(names)]
    continuous = dict(timestep_type="continuous", prediction_type="v_prediction")
    return cases + [pytest.param("EulerDiscreteScheduler", continuous, id="EulerDiscreteScheduler-continuous")]


NOISE_LEVEL = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")


@pytest.mark.parametrize("name, options", _scheduler_cases())
def test_the_phase_follows_the_trajectory_under_every_scheduler(name, options, monkeypatch):
    cls = getattr(diffusers, name, None)
    if cls is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    pipe = tiny_pipeline("sd15")
    try:
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)
        if any(pipe.scheduler.config.get(key) != value for key, value in options.items()):
            pytest.skip(f"diffusers {diffusers.__version__}'s {name} has no {options}")
        steps = 12
        try:  # some releases' schedulers fail on numpy 2 (DPMSolverSinglestep of diffusers 0.30)
            cls.from_config(pipe.scheduler.config).set_timesteps(steps)
        except ValueError as err:
            pytest.skip(f"diffusers {diffusers.__version__}'s {name} cannot make a {steps}-step schedule here: {err}")
        calls = record_run(pipe, steps, monkeypatch)
    except (ImportError, OptionalDependencyNotAvailable) as err:  # DPMSolverSDE needs torchsde
        pytest.skip(f"{name} cannot run here: {err}")
    phases = [{m for modes in layer.values() for m in modes} for _, layer in calls]
    assert all(len(p) == 1 for p in phases)
    phases = [p.pop() for p in phases]
    if name in NOISE_LEVEL or options:
        assert len(calls) == steps  # one UNet call per step: the i-th call is step i
        expected = ["agent" if i / (steps - 1) < 0.4 else "tome" for i in range(steps)]
    else:
        expected = ["agent" if 1 - t / 1000 < 0.4 else "tome" for t, _ in calls]
    assert phases == expected
    assert phases[0] == "agent" and phases[-1] == "tome" and phases == sorted(phases)


def test_playground_style_sdxl_with_the_edm_scheduler_runs_both_phases(monkeypatch):
    """Playground v2.5 is an SDXL pipeline with EDMDPMSolverMultistepScheduler."""
    if not hasattr(diffusers, "EDMDPMSolverMultistepScheduler"):
        pytest.skip(f"diffusers {diffusers.__version__} has no EDMDPMSolverMultistepScheduler")
    pipe = tiny_pipeline("sdxl")
    pipe.scheduler = diffusers.EDMDPMSolverMultistepScheduler()
    calls = record_run(pipe, 7, monkeypatch, max_downsample=2, min_tokens=0)
    phases = [{m for modes in layer.values() for m in modes}.pop() for _, layer in calls]
    assert phases == ["agent"] * 3 + ["tome"] * 4  # i / 6 < 0.4 for steps 0, 1 and 2


def test_a_bare_unet_given_a_timestep_outside_0_to_T_says_so_once(caplog):
    unet = agentsd.patch(tiny_pipeline("sd15").unet, min_tokens=0)
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad(), caplog.at_level("WARNING", logger="agentsd"):
        for t in (-0.4, -0.5, 500.0):
            unet(sample, torch.tensor(t), encoder_hidden_states=context)
    warnings = [r.getMessage() for r in caplog.records if "outside [0, 1000]" in r.getMessage()]
    assert len(warnings) == 1 and "agentsd.patch(pipe)" in warnings[0]


def phases_at(unet, timesteps):
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    phases = []
    with torch.no_grad():
        for t in timesteps:
            unet(sample, torch.tensor(float(t)), encoder_hidden_states=context)
            phases.append(agentsd.current_phase(unet))
    return phases


def test_agent_steps_1_keeps_the_agent_phase_to_the_last_step():
    """Schedulers ending at t = 0 reach progress 1.0: agent_steps=1.0 means every step."""
    unet = agentsd.patch(tiny_pipeline("sd15").unet, min_tokens=0, agent_steps=1.0)
    assert phases_at(unet, (999, 1, 0)) == ["agent"] * 3


def test_the_agent_phase_ends_where_progress_reaches_agent_steps():
    """Progress 1 - t / T under agent_steps is the agent phase; exactly at it, the ToMe phase."""
    unet = agentsd.patch(tiny_pipeline("sd15").unet, min_tokens=0, agent_steps=0.5)
    assert phases_at(unet, (501, 500, 499)) == ["agent", "tome", "tome"]
