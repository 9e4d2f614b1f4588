"""torch.compile over a patched UNet: no errors, no recompiles once both phases ran, eager outputs.

The `aot_eager` backend traces exactly what inductor would (dynamo graphs, guards, AOT
autograd) without spending minutes of C++ compilation on a 2-core machine.
"""

import pytest
import torch

import agentsd
from agentsd.testing import tiny_unet

# Slow (torch.compile): `python -m pytest -m slow` runs it (README, Set-up).
pytestmark = pytest.mark.slow

TIMESTEPS = (981, 961, 941, 581, 561, 541)  # three agent-phase and three ToMe-phase steps


def run(unet, sample, context):
    with torch.no_grad():
        return [unet(sample, torch.tensor(t), encoder_hidden_states=context).sample for t in TIMESTEPS]


# The default path, and the opt-in options that keep state per UNet call (shared matching)
# or skip the matching (pooled agents, no merge in the agent phase).
OPTIONS = {
    "default": dict(use_rand=True),
    "shared-matching+pool": dict(use_rand=True, share_matching=True, agent_selection="pool", ratio=0.0),
}


@pytest.mark.parametrize(
    "options, regional",
    [("default", False), ("default", True), ("shared-matching+pool", False)],
    ids=["whole-unet", "compile_repeated_blocks", "whole-unet-shared-matching+pool"],
)
def test_compiled_patched_unet_matches_eager_without_recompiling(options, regional):
    torch._dynamo.reset()
    torch.manual_seed(0)
    patched_unet = tiny_unet("sd15").eval()
    agentsd.patch(patched_unet, **OPTIONS[options])
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    eager = run(patched_unet, sample, context)
    agentsd.unpatch(patched_unet)
    baseline = run(patched_unet, sample, context)
    agentsd.patch(patched_unet, **OPTIONS[options])
    if regional:
        patched_unet.compile_repeated_blocks(backend="aot_eager")
        compiled = patched_unet
    else:
        compiled = torch.compile(patched_unet, backend="aot_eager")
    warm = run(compiled, sample, context)  # compiles each phase once
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = run(compiled, sample, context)  # any recompile would raise here
    for e, w, a in zip(eager, warm, again, strict=True):
        assert torch.allclose(w, e, atol=1e-5) and torch.allclose(a, e, atol=1e-5)
    # Unpatched afterwards, the compiled model computes the baseline again.
    agentsd.unpatch(patched_unet)
    for b, u in zip(baseline, run(compiled, sample, context), strict=True):
        assert torch.allclose(u, b, atol=1e-5)
    assert not torch.allclose(baseline[0], eager[0])
