"""agentsd under diffusers' context parallelism (`enable_parallelism` with Ulysses), two processes
on this CPU (`torchrun`, gloo over the loopback address; see cp_run.py for the one shim).

Each rank holds a shard of the video (Wan) or [text; image] (Flux) tokens. Until agentsd runs
agent attention on shards, every patched layer must hand its calls to the processor it wraps, with
the context-parallel configuration reaching that processor whichever was applied first, so the
output is exactly the unpatched model's, and `status` says why."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentsd.processors.self_attention import CONTEXT_PARALLEL

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "ContextParallelConfig"):
    pytest.skip("this diffusers has no context parallelism", allow_module_level=True)

TESTS = Path(__file__).parent
PATCH = dict(min_tokens=0, agent_steps=1.0, st=2)


def model_and_inputs(kind):
    """A tiny transformer of `kind` (the same weights in every process) and one call's inputs."""
    torch.manual_seed(0)
    if kind == "wan":
        from agentsd.testing.tiny_wan import TEXT_WIDTH, tiny_wan_transformer

        model = tiny_wan_transformer()
        inputs = dict(
            hidden_states=torch.randn(1, 16, 5, 16, 16),
            timestep=torch.tensor([900.0]),
            encoder_hidden_states=torch.randn(1, 16, TEXT_WIDTH),
        )
        return model, inputs
    from agentsd.testing.tiny_flux import PACKED, T5_WIDTH, tiny_flux_transformer

    model = tiny_flux_transformer().eval()
    h = w = 16
    ids = torch.stack([torch.zeros(h * w), torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)], 1)
    inputs = dict(
        hidden_states=torch.randn(1, h * w, PACKED),
        encoder_hidden_states=torch.randn(1, 16, T5_WIDTH),
        pooled_projections=torch.randn(1, 32),
        timestep=torch.tensor([0.9]),
        img_ids=ids.float(),
        txt_ids=torch.zeros(16, 3),
        guidance=torch.tensor([3.5]),
    )
    return model, inputs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path, kind, order, mode="ulysses"):
    out = tmp_path / f"{kind}-{order}-{mode}.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(TESTS / "cp_run.py"), str(out), kind, order, mode,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]), OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("kind", ["wan", "flux"])
@pytest.mark.parametrize("order", ["patch-first", "parallel-first"])
def test_patched_layers_hand_sharded_calls_to_diffusers(tmp_path, kind, order):
    model, inputs = model_and_inputs(kind)
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
    got = run_ranks(tmp_path, kind, order)
    assert got["reasons"] == [CONTEXT_PARALLEL] and got["calls"] == 1
    assert torch.allclose(got["output"], expected, rtol=1e-5, atol=1e-5)
