"""agentsd under diffusers' context parallelism (`enable_parallelism`, Ulysses and ring), two
processes on this CPU (`torchrun`, gloo over the loopback address; cp_run.py applies the CPU shims).

Wan (each rank's run of tokens as its whole token frames, cut frames around them) and Flux (whole
grid rows per rank) run agent attention on the shards: each rank merges its own tokens by the
same shard-local plan, the agents (and Flux's text queries) of every rank meet every rank's keys,
and the ranks send each other only those and their partial outputs (`agentsd.core.sharded`); the
ToMe phase attends exactly across the ranks' merged tokens through diffusers. Compared with
float64 references of the same shard-local plan in one process (reference_wan.py,
reference_flux.py), gradients included, and the elements sent counted against the design. Where
agentsd cannot act on the shards (a Wan run without a whole frame, Flux rows that do not split)
every patched layer hands its calls to the processor it wraps, which gets the parallel
configuration whichever came first: the output is the unpatched model's, and `status` says why."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference_flux import IMAGE_STREAM, TEXT_STREAM, reference_flux_sharded
from reference_joint import _linear
from reference_wan import reference_wan_sharded

# Slow (two processes launched through torchrun per test): `python -m pytest -m slow` runs it (README, Set-up).
pytestmark = pytest.mark.slow

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "ContextParallelConfig"):
    pytest.skip("this diffusers has no context parallelism", allow_module_level=True)

TESTS = Path(__file__).parent
RANKS = 2
FLUX_CELLS = dict(ratio=0.4, sx=2, sy=2, k_scale2=0.3, k_shortcut=0.075)
# Per family, the agent phase and the ToMe phase, first-token destinations. Wan: 2 x 4 x 4 boxes
# for the agents, 1 x 2 x 2 in the ToMe phase; Flux: 2 x 2 cells in both.
PHASES = {
    "wan": {
        "agent": dict(min_tokens=0, agent_steps=1.0, st=2, agent_ratio=0.9, use_rand=False),
        "tome": dict(min_tokens=0, agent_steps=0.0, late_st=1, use_rand=False),
    },
    "flux": {
        "agent": dict(min_tokens=0, agent_steps=1.0, agent_ratio=0.9, use_rand=False, agent_selection="match",
                      **FLUX_CELLS),
        "tome": dict(min_tokens=0, agent_steps=0.0, use_rand=False, late_ratio=0.4, late_sx=2, late_sy=2,
                     **FLUX_CELLS),
    },
}  # fmt: skip
# Wan kinds: (batch, token frames, rows, columns). 4 frames split into 2 per rank; 5 cut the third
# frame in two (each rank: 2 whole frames and half a frame); 1 frame leaves no rank a whole frame;
# 6 x 10 tokens per frame leave partial boxes at the bottom and the right of every shard.
WAN = {
    "wan": (1, 4, 8, 8), "wan-cut": (1, 5, 8, 8), "wan-thin": (1, 1, 8, 8), "wan-batch": (2, 4, 8, 8),
    "wan-uneven": (1, 4, 6, 10),
}  # fmt: skip
# Flux kinds: (batch, rows, columns); 16 text tokens. 15 rows do not split into whole rows per rank.
FLUX = {"flux": (1, 16, 16), "flux-odd": (1, 15, 16), "flux-batch": (2, 16, 16)}
FLUX_TEXT = 16


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
        return model.eval(), inputs
    from agentsd.testing.tiny_flux import PACKED, T5_WIDTH, tiny_flux_transformer

    model = tiny_flux_transformer().eval()
    batch, h, w = FLUX[kind]
    ids = torch.stack([torch.zeros(h * w), torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)], 1)
    inputs = dict(
        hidden_states=torch.randn(batch, h * w, PACKED),
        encoder_hidden_states=torch.randn(batch, FLUX_TEXT, T5_WIDTH),
        pooled_projections=torch.randn(batch, 32),
        timestep=torch.full((batch,), 0.9),
        img_ids=ids.float(),
        txt_ids=torch.zeros(FLUX_TEXT, 3),
        guidance=torch.full((batch,), 3.5),
    )
    return model, inputs


def output_weights(output):
    """The fixed weighting whose sum the gradient tests differentiate."""
    return torch.randn(output.shape, generator=torch.Generator().manual_seed(1))


def run_ranks(tmp_path, kind, order, phase="agent", mode="ulysses", param=""):
    out = tmp_path / f"{kind}-{order}-{phase}-{mode}.pt"
    command = [
        # --standalone: torchrun's own rendezvous on a port it picks free (no race with other processes).
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
        str(TESTS / "cp_run.py"), str(out), kind, order, phase, mode, param,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]), OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    fatal = done.stderr.find("Fatal Python error")  # a rank's abort: every thread's stack (faulthandler)
    assert done.returncode == 0, (done.stderr[fatal : fatal + 6000] if fatal >= 0 else "") + done.stderr[-3000:]
    return torch.load(out)


def wan_runs(frames, rows, columns):
    """Each rank's run of the video tokens: the frames wholly inside every run, as many on each
    (the fewest any run holds), and where they start in each run: (depth, leads)."""
    per_frame = rows * columns
    run = frames * per_frame // RANKS
    inside = [
        [t for t in range(frames) if t * per_frame >= r * run and (t + 1) * per_frame <= (r + 1) * run]
        for r in range(RANKS)
    ]
    return min(map(len, inside)), [whole[0] * per_frame - r * run for r, whole in enumerate(inside)]


class ShardedReference:
    """A processor computing `reference_wan_sharded` in one process, as a Wan block calls `attn1`."""

    def __init__(self, phase, grid, autograd=False):
        self.phase, self.grid, self.agents = phase, grid, []
        # The reference runs under torch.no_grad; the gradient test calls the function it wraps.
        self.reference = reference_wan_sharded.__wrapped__ if autograd else reference_wan_sharded

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        frames, rows, columns = self.grid
        depth, leads = wan_runs(*self.grid)
        agent = self.phase == "agent"
        out, used, n = self.reference(
            attn, hidden_states, rotary_emb, (depth, rows, columns), (2, 4, 4) if agent else (1, 2, 2),
            RANKS, ratio=0.4, agent_ratio=0.9 if agent else None, leads=leads,
        )  # fmt: skip
        assert used == agent
        self.agents.append(n)
        return out.to(hidden_states.dtype)


class ShardedFluxReference:
    """A processor computing `reference_flux_sharded` in one process, as Flux's blocks call their
    attention: a double-stream layer returns (image, text) through `to_out` and `to_add_out`, a
    single-stream one the unprojected output of [text; image]."""

    def __init__(self, phase, grid):
        self.grid, self.agents = grid, []
        self.settings = dict(FLUX_CELLS, agent_ratio=0.9 if phase == "agent" else None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        rows, columns = self.grid
        double = encoder_hidden_states is not None
        text, names = (encoder_hidden_states, TEXT_STREAM) if double else (hidden_states[:, :FLUX_TEXT], IMAGE_STREAM)
        grid = hidden_states if double else hidden_states[:, FLUX_TEXT:]
        text_out, grid_out, used, n = reference_flux_sharded(
            attn, text, names, grid, image_rotary_emb, (rows // RANKS, columns), RANKS, self.settings
        )
        assert used == (self.settings["agent_ratio"] is not None)
        self.agents.append(n)
        dtype = hidden_states.dtype
        if not double:
            return torch.cat([text_out, grid_out], dim=1).to(dtype)
        image = torch.stack([_linear(attn.to_out[0], t) for t in grid_out]).to(dtype)
        return image, torch.stack([_linear(attn.to_add_out, t) for t in text_out]).to(dtype)


def install_reference(model, kind, phase, autograd=False):
    """Every patched layer's processor replaced by the one-process reference of the sharded plan."""
    if kind.startswith("wan"):
        _, frames, rows, columns = WAN[kind]
        reference = ShardedReference(phase, (frames, rows, columns), autograd)
        for block in model.blocks:
            block.attn1.set_processor(reference)
        return reference
    reference = ShardedFluxReference(phase, FLUX[kind][1:])
    for block in (*model.transformer_blocks, *model.single_transformer_blocks):
        block.attn.set_processor(reference)
    return reference


def local_grid(kind):
    """Each rank's grid, and its tokens (Wan: those of its run, cut frames included)."""
    if kind.startswith("wan"):
        _, frames, rows, columns = WAN[kind]
        return (wan_runs(frames, rows, columns)[0], rows, columns), frames * rows * columns // RANKS
    _, rows, columns = FLUX[kind]
    return (rows // RANKS, columns), rows * columns // RANKS


def expected_sent(kind, n_local, model):
    """Elements this rank sends per call in the agent phase, per layer, sample and head: its agents
    and text queries ((n + m) d), every agent's partial output and log-sum-exp (P n (d + 1)), and
    its answers to every rank's text queries (P m (d + 1))."""
    if kind.startswith("wan"):
        batch, layers, heads, head_dim, text = WAN[kind][0], len(model.blocks), 2, 12, 0
    else:
        layers = len(model.transformer_blocks) + len(model.single_transformer_blocks)
        batch, heads, head_dim, text = FLUX[kind][0], 4, 8, FLUX_TEXT // RANKS
    per_head = (n_local + text) * head_dim + RANKS * (n_local + text) * (head_dim + 1)
    return batch * layers * heads * per_head


CASES = [
    ("wan", "patch-first", "agent", "ulysses"),
    ("wan", "parallel-first", "agent", "ulysses"),
    ("wan", "patch-first", "tome", "ulysses"),
    ("wan", "parallel-first", "tome", "ulysses"),
    ("wan-batch", "patch-first", "agent", "ulysses"),
    ("wan-uneven", "parallel-first", "agent", "ulysses"),
    ("wan-cut", "patch-first", "agent", "ulysses"),
    ("wan-cut", "parallel-first", "tome", "ulysses"),
    ("wan", "patch-first", "agent", "ring"),
    ("wan", "parallel-first", "tome", "ring"),
    ("flux", "patch-first", "agent", "ulysses"),
    ("flux", "parallel-first", "agent", "ulysses"),
    ("flux", "patch-first", "tome", "ulysses"),
    ("flux-batch", "parallel-first", "agent", "ring"),
    ("flux", "patch-first", "tome", "ring"),
]


@pytest.mark.parametrize("kind, order, phase, mode", CASES, ids=["-".join(case) for case in CASES])
def test_agentsd_acts_on_the_shards(tmp_path, kind, order, phase, mode):
    model, inputs = model_and_inputs(kind)
    layer = []
    with torch.no_grad():
        unpatched = model(**inputs, return_dict=False)[0]
        reference = install_reference(model, kind, phase)
        first = model.transformer_blocks[0].attn if kind.startswith("flux") else model.blocks[0].attn1
        first.register_forward_hook(lambda module, args, output: layer.append(output))
        expected = model(**inputs, return_dict=False)[0]
    got = run_ranks(tmp_path, kind, order, phase, mode)
    # The first patched layer's outputs on rank 0 (Flux: image and text) are the first run of the reference's.
    outputs = layer[0] if isinstance(layer[0], tuple) else (layer[0],)
    for mine, full in zip(got["layer"], outputs, strict=True):
        first_run = full[:, : full.shape[1] // RANKS]
        error = float((mine - first_run).norm() / first_run.norm())
        assert error < 1e-5, error
    local, tokens = local_grid(kind)
    assert got["modes"] == [phase] and got["reasons"] == ["None"] and got["grids"] == [local]
    degrees = "ulysses 2 x ring 1" if mode == "ulysses" else "ulysses 1 x ring 2"
    layout = f"context parallel: {degrees} = 2 ranks, {tokens} tokens per rank (agentsd acts on the shards)"
    assert got["text"].splitlines()[1] == layout
    error = float((got["output"] - expected).norm() / expected.norm())
    assert error < 1e-5, error
    assert not torch.allclose(got["output"], unpatched, atol=1e-3)
    if phase == "agent":
        assert got["sent"] == expected_sent(kind, reference.agents[0], model)
    else:
        assert got["sent"] == 0  # the ToMe phase sends through diffusers' Ulysses or ring only


@pytest.mark.parametrize(
    "kind, param", [("flux", "single_transformer_blocks.0.attn.to_q.weight"), ("wan", "blocks.0.attn1.to_q.weight")]
)
def test_gradients_flow_through_the_collectives(tmp_path, kind, param):
    """The backward pass through agentsd's collectives: the gradients of the input and of a query
    projection, summed over the ranks, equal the one-process reference's."""
    model, inputs = model_and_inputs(kind)
    install_reference(model, kind, "agent", autograd=True)
    sample = inputs["hidden_states"].requires_grad_(True)
    output = model(**inputs, return_dict=False)[0]
    (output * output_weights(output)).sum().backward()
    got = run_ranks(tmp_path, kind, "patch-first", "agent", "ulysses", param)
    for name, expected in (("input_grad", sample.grad), ("weight_grad", dict(model.named_parameters())[param].grad)):
        error = float((got[name] - expected).norm() / expected.norm())
        assert error < 1e-5, (name, error)


@pytest.mark.parametrize("kind", ["wan-thin", "flux-odd"])
@pytest.mark.parametrize("order", ["patch-first", "parallel-first"])
def test_what_agentsd_cannot_shard_runs_diffusers_exactly(tmp_path, kind, order):
    model, inputs = model_and_inputs(kind)
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
    got = run_ranks(tmp_path, kind, order)
    why = "32 tokens holds no whole token frame" if kind == "wan-thin" else "15 token rows do not split"
    assert len(got["reasons"]) == 1 and why in got["reasons"][0]
    assert got["modes"] == ["exact"] and got["sent"] == 0
    assert got["text"].splitlines()[1] == "context parallel: ulysses 2 x ring 1 = 2 ranks"
    assert torch.allclose(got["output"], expected, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(got["output"].abs().max()))
