"""agentsd under diffusers' context parallelism (`enable_parallelism`, Ulysses), two processes on
this CPU (`torchrun`, gloo over the loopback address; cp_run.py holds the one shim).

Wan with whole token frames per rank runs agent attention on the shards: each rank merges its own
frames by the same shard-local plan, the agents of both ranks gather from every rank's keys, and
the ranks send each other only the agents and their partial outputs (`agentsd.core.sharded`); the
ToMe phase attends exactly across the ranks' merged tokens through diffusers. Compared with the
float64 reference of the same shard-local plan in one process (reference_wan.py), and the elements
sent counted against the design. Where agentsd cannot act on the shards (Flux; Wan frames that do
not split) every patched layer hands its calls to the processor it wraps, which gets the parallel
configuration whichever came first: the output is the unpatched model's, and `status` says why."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference_wan import reference_wan_sharded

from agentsd.processors.self_attention import CONTEXT_PARALLEL

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "ContextParallelConfig"):
    pytest.skip("this diffusers has no context parallelism", allow_module_level=True)

TESTS = Path(__file__).parent
RANKS = 2
# The agent phase (2 x 4 x 4 boxes) and the ToMe phase (1 x 2 x 2 boxes), first-token destinations.
PHASES = {
    "agent": dict(min_tokens=0, agent_steps=1.0, st=2, agent_ratio=0.9, use_rand=False),
    "tome": dict(min_tokens=0, agent_steps=0.0, late_st=1, use_rand=False),
}
# Wan kinds: (batch, token frames, rows, columns). 4 frames split into 2 per rank, 5 do not; 6 x 10
# tokens per frame leave partial boxes at the bottom and the right of every shard.
WAN = {"wan": (1, 4, 8, 8), "wan-odd": (1, 5, 8, 8), "wan-batch": (2, 4, 8, 8), "wan-uneven": (1, 4, 6, 10)}


def model_and_inputs(kind):
    """A tiny transformer of `kind` (the same weights in every process) and one call's inputs."""
    torch.manual_seed(0)
    if kind.startswith("wan"):
        from agentsd.testing.tiny_wan import TEXT_WIDTH, tiny_wan_transformer

        model = tiny_wan_transformer()
        batch, frames, rows, columns = WAN[kind]
        inputs = dict(
            hidden_states=torch.randn(batch, 16, frames, 2 * rows, 2 * columns),
            timestep=torch.full((batch,), 900.0),
            encoder_hidden_states=torch.randn(batch, 16, TEXT_WIDTH),
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


def run_ranks(tmp_path, kind, order, phase="agent", mode="ulysses"):
    out = tmp_path / f"{kind}-{order}-{phase}-{mode}.pt"
    command = [
        # --standalone: torchrun's own rendezvous on a port it picks free (no race with other processes).
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
        str(TESTS / "cp_run.py"), str(out), kind, order, phase, mode,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]), OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


class ShardedReference:
    """A processor computing `reference_wan_sharded` in one process, as a Wan block calls `attn1`."""

    def __init__(self, phase, grid):
        self.phase, self.grid, self.agents = phase, grid, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        frames, rows, columns = self.grid
        agent = self.phase == "agent"
        out, used, n = reference_wan_sharded(
            attn, hidden_states, rotary_emb, (frames // RANKS, rows, columns), (2, 4, 4) if agent else (1, 2, 2),
            RANKS, ratio=0.4, agent_ratio=0.9 if agent else None,
        )  # fmt: skip
        assert used == agent
        self.agents.append(n)
        return out.to(hidden_states.dtype)


CASES = [
    ("wan", "patch-first", "agent", "ulysses"),
    ("wan", "parallel-first", "agent", "ulysses"),
    ("wan", "patch-first", "tome", "ulysses"),
    ("wan", "parallel-first", "tome", "ulysses"),
    ("wan-batch", "patch-first", "agent", "ulysses"),
    ("wan-uneven", "parallel-first", "agent", "ulysses"),
    # Ring: agentsd's own collectives in the agent phase (the ToMe phase would go through diffusers'
    # ring, whose native backend returns no log-sum-exp on a CPU).
    ("wan", "patch-first", "agent", "ring"),
]


@pytest.mark.parametrize("kind, order, phase, mode", CASES, ids=["-".join(case) for case in CASES])
def test_wan_runs_agent_attention_on_the_shards(tmp_path, kind, order, phase, mode):
    model, inputs = model_and_inputs(kind)
    batch, frames, rows, columns = WAN[kind]
    with torch.no_grad():
        unpatched = model(**inputs, return_dict=False)[0]
        reference = ShardedReference(phase, (frames, rows, columns))
        for block in model.blocks:
            block.attn1.set_processor(reference)
        expected = model(**inputs, return_dict=False)[0]
    got = run_ranks(tmp_path, kind, order, phase, mode)
    local = (frames // RANKS, rows, columns)
    assert got["modes"] == [phase] and got["reasons"] == ["None"] and got["grids"] == [local]
    degrees = "ulysses 2 x ring 1" if mode == "ulysses" else "ulysses 1 x ring 2"
    layout = f"context parallel: {degrees} = 2 ranks, {math.prod(local)} tokens per rank (agentsd acts on the shards)"
    assert got["text"].splitlines()[1] == layout
    error = float((got["output"] - expected).norm() / expected.norm())
    assert error < 1e-5, error
    assert not torch.allclose(got["output"], unpatched, atol=1e-3)
    heads, head_dim, layers = 2, 12, len(model.blocks)
    if phase == "agent":  # per layer: this rank's agents, then every agent's partial output and log-sum-exp
        n_local = reference.agents[0]
        assert got["sent"] == batch * layers * heads * (n_local * head_dim + RANKS * n_local * (head_dim + 1))
    else:
        assert got["sent"] == 0  # the ToMe phase sends through diffusers' Ulysses only


@pytest.mark.parametrize("kind", ["wan-odd", "flux"])
@pytest.mark.parametrize("order", ["patch-first", "parallel-first"])
def test_what_agentsd_cannot_shard_runs_diffusers_exactly(tmp_path, kind, order):
    model, inputs = model_and_inputs(kind)
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
    got = run_ranks(tmp_path, kind, order)
    if kind == "flux":
        assert got["reasons"] == [CONTEXT_PARALLEL]
    else:
        assert len(got["reasons"]) == 1 and "5 token frames do not split into whole frames" in got["reasons"][0]
    assert got["modes"] == ["exact"] and got["sent"] == 0
    assert got["text"].splitlines()[1] == "context parallel: ulysses 2 x ring 1 = 2 ranks"
    assert torch.allclose(got["output"], expected, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(got["output"].abs().max()))
