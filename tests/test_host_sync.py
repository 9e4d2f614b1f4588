"""GPU hygiene, checked on the CPU: inside the processors nothing reads a tensor's value on the
host (each such read is a host-device synchronisation on a GPU), and a UNet call sends the
destination and source positions of all its layers to the device in one copy."""

import pytest
import torch

import agentsd
from agentsd import AgentSDConfig
from agentsd.processors.self_attention import AgentSDProcessor, AgentSDState
from agentsd.testing import tiny_unet

# Tensor methods that copy a value to the host (or, for nonzero, size a result by the data).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu", "numpy")


@pytest.mark.parametrize(
    "options",
    [dict(), dict(share_matching=True), dict(agent_selection="pool"), dict(attention_backend="einsum")],
    ids=["default", "shared-matching", "pooled-agents", "einsum"],
)
def test_processors_never_read_tensor_values_on_the_host(options, monkeypatch):
    torch.manual_seed(0)
    unet = agentsd.patch(tiny_unet("sd15").eval(), **options)
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    inside, seen = [], []

    def spying(name):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, **kwargs):
            if inside:
                seen.append(name)
            return real(self, *args, **kwargs)

        return spy

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, spying(name))
    processor_call = AgentSDProcessor.__call__

    def flagged(self, *args, **kwargs):
        inside.append(self.name)
        try:
            return processor_call(self, *args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(AgentSDProcessor, "__call__", flagged)
    with torch.no_grad():
        for timestep in (981, 101):  # both phases
            unet(sample, torch.tensor(timestep), encoder_hidden_states=context)
    assert {mode for mode in agentsd.status(unet).activity.acting_calls} == {"agent", "tome"}
    assert seen == []


def copies_to(device_type, monkeypatch):
    copies = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.device.type == device_type and self.device.type != device_type:
            copies.append(self.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    return copies


def planned_state(**config):
    state = AgentSDState(AgentSDConfig(min_tokens=0, max_downsample=2, **config))
    for i in range(3):  # two grids: three layers at the latent's size and two at half of it
        state.register(f"top.{i}", 1)
    state.register("mid.0", 2), state.register("mid.1", 2)
    return state


def test_positions_reach_the_device_in_one_copy_per_call(monkeypatch):
    """A device stand-in (`meta`) shows the copies: random draws, one copy per UNet call for all
    five layers; fixed positions, copied once per grid and reused."""
    copies = copies_to("meta", monkeypatch)
    state = planned_state(agent_steps=1.0)
    for timestep in (981, 961):
        copies.clear()
        state.begin_call(torch.empty(2, 4, 32, 32, device="meta"), torch.tensor(timestep))
        plans = [p for p in state.plans.values() if p is not None]
        assert len(plans) == 5 and all(p.dst.device.type == p.src.device.type == "meta" for p in plans)
        assert copies == [3 * 32 * 32 + 2 * 16 * 16]  # each layer's positions: its whole grid, in one copy

    fixed = planned_state(agent_steps=1.0, use_rand=False)
    copies.clear()
    fixed.begin_call(torch.empty(2, 4, 32, 32, device="meta"), torch.tensor(981))
    assert len(copies) == 4  # destinations and sources of the two grids
    copies.clear()
    fixed.begin_call(torch.empty(2, 4, 32, 32, device="meta"), torch.tensor(961))
    assert copies == []
