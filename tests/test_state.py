"""No state leaks: between calls, between pipelines, across threads and patch cycles."""

import gc
import threading

import numpy as np
import torch

import agentsd
from agentsd import AgentSDConfig
from agentsd.core.merge import destination_indices
from agentsd.processors.self_attention import AgentSDProcessor, AgentSDState
from agentsd.testing import tiny_pipeline


def generate(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red cube", num_inference_steps=3, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images  # fmt: skip


def test_twenty_calls_in_a_row_give_the_same_image():
    pipe = agentsd.patch(tiny_pipeline("sd15"), agent_steps=0.5)
    first = generate(pipe)
    assert all(np.array_equal(generate(pipe), first) for _ in range(19))


def test_two_pipelines_with_different_configs_do_not_affect_each_other():
    a = agentsd.patch(tiny_pipeline("sd15", seed=0), ratio=0.2, agent_steps=1.0)
    b = agentsd.patch(tiny_pipeline("sd15", seed=0), ratio=0.5, agent_steps=1.0, seed=7)
    alone_a, alone_b = generate(a), generate(b)
    assert not np.array_equal(alone_a, alone_b)
    assert np.array_equal(generate(b), alone_b) and np.array_equal(generate(a), alone_a)  # alternately

    results = {}

    def run(name, pipe):
        results[name] = [generate(pipe) for _ in range(3)]

    threads = [threading.Thread(target=run, args=(n, p)) for n, p in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(img, alone_a) for img in results["a"])
    assert all(np.array_equal(img, alone_b) for img in results["b"])


def test_a_thousand_patch_cycles_leave_nothing_behind():
    pipe = tiny_pipeline("sd15")
    before = dict(pipe.unet.attn_processors)
    baseline = generate(pipe)
    agentsd.patch(pipe)
    agentsd.unpatch(pipe)
    gc.collect()
    live = sum(isinstance(o, AgentSDProcessor) for o in gc.get_objects())
    for i in range(1000):
        agentsd.patch(pipe, ratio=0.1 + 0.3 * (i % 2))
        if i % 3:
            agentsd.unpatch(pipe)
    agentsd.unpatch(pipe)
    gc.collect()
    assert not pipe.unet._forward_pre_hooks
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    assert sum(isinstance(o, AgentSDProcessor) for o in gc.get_objects()) == live
    assert np.array_equal(generate(pipe), baseline)


def draw(state, timestep, batch=2):
    state.begin_call(torch.zeros(batch, 4, 16, 16), torch.tensor(timestep))
    return state.plans["layer"].dst.clone()


def test_random_destinations_are_redrawn_every_timestep_and_repeat_for_a_repeated_one():
    state = AgentSDState(AgentSDConfig(agent_steps=1.0))
    state.register("layer", 1)
    first, second, again = draw(state, 981), draw(state, 961), draw(state, 981)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)
    assert not torch.equal(first, destination_indices(16, 16, 4, 4))  # drawn, not top-left


def test_every_batch_size_gets_the_same_draw():
    """The draw depends on the seed and the timestep only: an image never depends on its batch."""
    state = AgentSDState(AgentSDConfig(agent_steps=1.0))
    state.register("layer", 1)
    top_left = destination_indices(16, 16, 4, 4)
    for timestep in (981, 961, 941):
        drawn = [draw(state, timestep, batch=batch) for batch in (1, 2, 3, 4)]
        assert not torch.equal(drawn[0], top_left)
        assert all(torch.equal(d, drawn[0]) for d in drawn)
