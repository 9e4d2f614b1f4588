"""The agent/ToMe phase switch over real scheduler runs, counted per layer and step."""

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

import agentsd
from agentsd.processor import AgentSDProcessor
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
    from agentsd.generation import SCHEDULERS, set_scheduler

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
