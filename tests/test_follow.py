"""The patch follows the pipeline: what users do before or after `agentsd.patch` never switches
agent attention off in silence.

Every operation runs in both orders (operation then patch, patch then operation) on tiny
pipelines: agent attention acts (agentsd's own attention path runs, and the output differs from
the same operation without agentsd), `is_patched` and `status` tell the truth, and unpatching
gives the output of the same operation without agentsd, bit for bit.
"""

import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor, XFormersAttnProcessor
from test_compat import ip_adapter

import agentsd
from agentsd.api.community import call_with_agentsd
from agentsd.processors.self_attention import AgentSDProcessor
from agentsd.testing import tiny_pipeline

PATCH = dict(agent_steps=1.0, min_tokens=0)


def generate(pipe, extra=None, steps=3):
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a red cube", num_inference_steps=steps, height=64, width=64, output_type="np")
    return pipe(generator=torch.Generator().manual_seed(0), **args, **(extra or {})).images


@pytest.fixture
def agent_calls(monkeypatch):
    """Counts the layer calls that ran agentsd's own attention path."""
    calls = []
    forward = AgentSDProcessor._forward

    def counting(self, attn, hidden_states, plan, *rest):
        calls.append((self.name, plan.mode))
        return forward(self, attn, hidden_states, plan, *rest)

    monkeypatch.setattr(AgentSDProcessor, "_forward", counting)
    return calls


def slicing(pipe):
    pipe.enable_attention_slicing()
    return {}


def fused(pipe):
    if not hasattr(pipe, "fuse_qkv_projections"):
        pytest.skip("this diffusers has no fuse_qkv_projections")
    pipe.fuse_qkv_projections()
    return {}


def by_hand(pipe):
    pipe.unet.set_attn_processor(AttnProcessor())
    return {}


def default_processors(pipe):
    pipe.unet.set_default_attn_processor()
    return {}


OPERATIONS = {
    "enable_attention_slicing": slicing,
    "fuse_qkv_projections": fused,
    "set_attn_processor": by_hand,
    "set_default_attn_processor": default_processors,
}


def check_acts_and_unpatches(pipe, extra, reference, agent_calls):
    """agentsd acts on the pipeline as it is, delegating to the processors `reference` (the same
    operations without agentsd) has, reports it, and unpatches to `reference`'s processors and
    output."""
    operation_only = generate(reference, extra)
    expected = {name: type(p).__name__ for name, p in reference.unet.attn_processors.items()}
    agent_calls.clear()
    out = generate(pipe, extra)
    assert agent_calls and {mode for _, mode in agent_calls} == {"agent"}
    assert np.isfinite(out).all() and not np.array_equal(out, operation_only)
    status = agentsd.status(pipe)
    assert agentsd.is_patched(pipe) and status.acting
    assert status.activity.ran_agent_attention
    assert all(layer.mode == "agent" and layer.reason is None for layer in status.layers)
    assert all(layer.processor == expected[layer.name] for layer in status.layers)
    agentsd.unpatch(pipe)
    assert not agentsd.is_patched(pipe)
    assert {name: type(p).__name__ for name, p in pipe.unet.attn_processors.items()} == expected
    assert np.array_equal(generate(pipe, extra), operation_only)


@pytest.mark.parametrize("order", ["operation-then-patch", "patch-then-operation"])
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_processor_changes_in_either_order(operation, order, agent_calls):
    reference = tiny_pipeline("sd15")
    OPERATIONS[operation](reference)
    pipe = tiny_pipeline("sd15")
    if order == "operation-then-patch":
        OPERATIONS[operation](pipe)
        agentsd.patch(pipe, **PATCH)
    else:
        agentsd.patch(pipe, **PATCH)
        OPERATIONS[operation](pipe)
    check_acts_and_unpatches(pipe, {}, reference, agent_calls)


def test_status_names_the_users_latest_processor():
    pipe = agentsd.patch(tiny_pipeline("sd15"), **PATCH)
    pipe.enable_attention_slicing()
    status = agentsd.status(pipe)
    assert all(layer.processor == "SlicedAttnProcessor" for layer in status.layers)
    assert all("wraps it at the next UNet call" in layer.reason for layer in status.layers)
    generate(pipe, steps=1)
    assert all(layer.reason is None and layer.mode == "agent" for layer in agentsd.status(pipe).layers)


@pytest.mark.parametrize("order", ["fuse-patch-unfuse", "patch-fuse-unfuse"])
def test_unfusing_after_patching(order, agent_calls):
    reference = tiny_pipeline("sd15")
    fused(reference)
    reference.unfuse_qkv_projections()
    pipe = tiny_pipeline("sd15")
    if order == "fuse-patch-unfuse":
        pipe.fuse_qkv_projections()
        agentsd.patch(pipe, **PATCH)
    else:
        agentsd.patch(pipe, **PATCH)
        pipe.fuse_qkv_projections()
        generate(pipe, steps=1)  # runs with the fused projections
    pipe.unfuse_qkv_projections()
    check_acts_and_unpatches(pipe, {}, reference, agent_calls)
    # unfuse_qkv_projections after unpatching restores no agentsd processor either.
    pipe.unfuse_qkv_projections()
    assert not any(isinstance(p, AgentSDProcessor) for p in pipe.unet.attn_processors.values())
    assert np.array_equal(generate(pipe), generate(reference))


@pytest.mark.parametrize("order", ["load-then-patch", "patch-then-load"])
def test_ip_adapter_loaded_in_either_order(order, agent_calls, monkeypatch):
    """`load_ip_adapter` rebuilds every attn1 processor from its class with no arguments: after
    patching, that is an unbound agentsd processor, which the next UNet call wraps again."""
    reference, extra = ip_adapter()
    if order == "load-then-patch":
        pipe, extra = ip_adapter()
        agentsd.patch(pipe, **PATCH)
    else:
        patch_first = []
        real_tiny = tiny_pipeline

        def patched_tiny(kind="sd15", **kwargs):  # patch the pipeline before load_ip_adapter runs
            pipe = agentsd.patch(real_tiny(kind, **kwargs), **PATCH)
            patch_first.append(pipe)
            return pipe

        monkeypatch.setattr("test_compat.tiny_pipeline", patched_tiny)
        pipe, extra = ip_adapter()
        assert patch_first == [pipe]
        unbound = [p for p in pipe.unet.attn_processors.values() if isinstance(p, AgentSDProcessor)]
        assert unbound and all(p.state is None for p in unbound)  # diffusers rebuilt them from the class
    check_acts_and_unpatches(pipe, extra, reference, agent_calls)


def test_xformers_processors_set_after_patching_are_wrapped_and_chosen_on_cuda():
    """On this CPU xformers cannot run, so it is set on the patched layers only, where agentsd
    serves every call: the layers delegate to it, and its kernels are chosen on CUDA alone."""
    pipe = agentsd.patch(tiny_pipeline("sd15"), **PATCH)
    names = [layer.name for layer in pipe.unet._agentsd_patch.layers]
    pipe.unet.set_attn_processor({**pipe.unet.attn_processors, **{n: XFormersAttnProcessor() for n in names}})
    generate(pipe, steps=1)
    for name in names:
        processor = pipe.unet.attn_processors[name]
        assert isinstance(processor, AgentSDProcessor) and isinstance(processor.original, XFormersAttnProcessor)
        assert processor.backend(torch.device("cuda")) == "xformers"
        assert processor.backend(torch.device("cpu")) == "sdpa"
    assert {layer.processor for layer in agentsd.status(pipe).layers} == {"XFormersAttnProcessor"}
    agentsd.unpatch(pipe)
    assert all(isinstance(pipe.unet.attn_processors[n], XFormersAttnProcessor) for n in names)


@pytest.mark.parametrize("order", ["tomesd-then-agentsd", "agentsd-then-tomesd"])
def test_another_token_merging_patch_is_reported_not_hidden(order, caplog):
    tomesd = pytest.importorskip("tomesd")
    reference = tiny_pipeline("sd15")
    tomesd.apply_patch(reference, ratio=0.5)
    tomesd_only = generate(reference)

    pipe = tiny_pipeline("sd15")
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        if order == "tomesd-then-agentsd":
            tomesd.apply_patch(pipe, ratio=0.5)
            agentsd.patch(pipe, **PATCH)
        else:
            agentsd.patch(pipe, **PATCH)
            tomesd.apply_patch(pipe, ratio=0.5)
        assert not agentsd.is_patched(pipe)
        out = generate(pipe)
    assert caplog.text.count("token-merged by ToMe for SD") == 1  # once, naming the layers
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in caplog.text
    assert np.array_equal(out, tomesd_only)
    status = agentsd.status(pipe)
    assert status.installed and not status.acting and not status.activity.ran_agent_attention
    assert all("tomesd.remove_patch" in layer.reason for layer in status.layers)
    assert agentsd.current_phase(pipe) is None

    tomesd.remove_patch(pipe)  # agentsd acts again
    assert agentsd.is_patched(pipe)
    generate(pipe, steps=1)
    assert agentsd.current_phase(pipe) == "agent"
    agentsd.unpatch(pipe)
    assert np.array_equal(generate(pipe), generate(tiny_pipeline("sd15")))


def test_the_schedule_reads_T_from_the_scheduler_in_use():
    pipe = agentsd.patch(tiny_pipeline("sd15"), min_tokens=0)  # agent phase while 1 - t / T < 0.4
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, num_train_timesteps=500)
    phases = []

    def record(unet, args, output):  # after each UNet call: its timestep and the phase it ran
        phases.append((int(args[1]), agentsd.current_phase(pipe)))

    pipe.unet.register_forward_hook(record)
    generate(pipe, steps=10)
    expected = [(t, "agent" if 1 - t / 500 < 0.4 else "tome") for t, _ in phases]
    assert phases == expected
    assert {phase for _, phase in phases} == {"agent", "tome"}  # with T = 1000 all would be ToMe


def test_recording_phases_gives_the_phase_of_every_unet_call():
    """DDIM, 5 steps, T = 1000: t = 801, 601 before progress 0.4 (agent), then ToMe; a UNet
    without any layer agentsd can act on runs exact attention at every call."""
    from agentsd.api.status import describe_phases, recording_phases

    pipe = agentsd.patch(tiny_pipeline("sd15"), min_tokens=0)
    hooks = dict(pipe.unet._forward_hooks)  # agentsd's own
    with recording_phases(pipe) as phases:
        generate(pipe, steps=5)
    assert phases == ["agent", "agent", "tome", "tome", "tome"]
    assert describe_phases(phases) == "1-2 agent attention, 3-5 token merging"
    assert pipe.unet._forward_hooks == hooks  # the recording hook is gone after the block
    sdxl = agentsd.patch(tiny_pipeline("sdxl"))  # max_downsample=1: no layer
    with recording_phases(sdxl) as phases:
        generate(sdxl, steps=2)
    assert describe_phases(phases) == "1-2 exact attention"
    assert describe_phases(["agent", "tome", "agent"]) == "1 agent attention, 2 token merging, 3 agent attention"
    assert describe_phases([]) == ""


def test_a_patch_that_matched_no_layer_reports_no_phase():
    pipe = agentsd.patch(tiny_pipeline("sdxl"))  # max_downsample=1: SDXL has no layer there
    assert not agentsd.is_patched(pipe) and agentsd.patched_config(pipe) is not None
    generate(pipe, steps=1)
    assert agentsd.current_phase(pipe) is None
    assert not agentsd.status(pipe).acting


def test_every_layer_under_min_tokens_warns_once_and_reports_why(caplog):
    pipe = agentsd.patch(tiny_pipeline("sd15"), min_tokens=1024)  # the grids are 16x16
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        generate(pipe)
    assert caplog.text.count("no patched layer runs agent attention") == 1
    assert "16x16 = 256 tokens < min_tokens=1024" in caplog.text
    assert agentsd.current_phase(pipe) is None
    summary = agentsd.status(pipe).activity.summary()
    assert "no layer ran agent attention" in summary and "min_tokens=1024" in summary


def test_baseline_in_the_community_pipelines_also_for_a_patched_pipeline():
    pipe = tiny_pipeline("sd15")
    baseline = generate(pipe)
    agentsd.patch(pipe, ratio=0.3, **PATCH)
    patched_out = generate(pipe)
    out = call_with_agentsd(pipe, lambda: generate(pipe), False, "paper")
    assert np.array_equal(out, baseline)
    assert agentsd.patched_config(pipe).ratio == 0.3  # the user's patch is back
    assert np.array_equal(generate(pipe), patched_out)


def test_an_unbound_processor_is_the_default_attention():
    pipe = tiny_pipeline("sd15")
    expected = generate(pipe)
    pipe.unet.set_attn_processor(AgentSDProcessor())
    assert np.array_equal(generate(pipe), expected)
    assert not agentsd.is_patched(pipe)


@pytest.mark.parametrize("agent_steps", [1.0, 0.0], ids=["agent-phase", "tome-phase"])
def test_gradients_flow_through_a_patched_unet(agent_steps):
    """Guidance methods and LoRA training backpropagate through the UNet: the default backend
    gives the gradients of the unfused einsum backend."""
    pipe = tiny_pipeline("sd15")
    sample = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, 32)
    grads = {}
    for backend in ("sdpa", "einsum"):
        agentsd.patch(pipe, agent_steps=agent_steps, attention_backend=backend, min_tokens=0)
        x = sample.clone().requires_grad_(True)
        pipe.unet.zero_grad()
        pipe.unet(x, torch.tensor(500), encoder_hidden_states=context).sample.square().mean().backward()
        weight = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
        grads[backend] = (x.grad, weight.grad.clone())
    for got, want in zip(grads["sdpa"], grads["einsum"], strict=True):
        assert torch.isfinite(got).all() and got.abs().sum() > 0
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-6)
