"""One patched model shared by threads and pipelines, copied, pickled, validated in inference
mode then trained: each use gets exactly what it would get alone."""

import copy
import io
import logging
import pickle
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import agentsd
from agentsd.api.follow import delegate_of as _delegate_of
from agentsd.processors.self_attention import AgentSDProcessor
from agentsd.testing import tiny_pipeline, tiny_unet

# (image side, steps, images per prompt): sizes, schedules and batches that differ.
JOBS = [(96, 10, 1), (96, 7, 2), (64, 13, 1), (96, 5, 3)]


def request_pipeline(base):
    """diffusers' server pattern: a pipeline per request sharing the models, with its own scheduler
    and tokenizer (a transformers tokenizer is not thread-safe: it sets its padding per call, and
    the pipeline tokenizes twice with different padding, so even unpatched pipelines sharing one
    tokenizer get the wrong text embeddings now and then)."""
    scheduler = base.scheduler.from_config(base.scheduler.config)
    components = dict(base.components, scheduler=scheduler, tokenizer=copy.deepcopy(base.tokenizer))
    pipe = type(base)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_job(pipe, job, seed):
    size, steps, images = job
    return pipe(
        "a red cube", height=size, width=size, num_inference_steps=steps, num_images_per_prompt=images,
        output_type="np", generator=torch.Generator().manual_seed(seed),
    ).images  # fmt: skip


@pytest.mark.parametrize("share_matching", [False, True], ids=["default", "share_matching"])
def test_concurrent_requests_on_one_unet_get_what_they_get_alone(share_matching):
    base = agentsd.patch(tiny_pipeline("sd15"), min_tokens=0, agent_steps=0.5, share_matching=share_matching)
    alone = [run_job(request_pipeline(base), job, seed) for seed, job in enumerate(JOBS)]

    # A pause after agentsd's own pre-hook lets the other threads start their calls in between:
    # a plan kept per UNet would be overwritten before this call's layers read it.
    base.unet.register_forward_pre_hook(lambda *_: time.sleep(0.002))
    results, errors = {}, []
    start = threading.Barrier(len(JOBS))

    def serve(seed, job):
        try:
            pipe = request_pipeline(base)
            start.wait()
            results[seed] = run_job(pipe, job, seed)
        except Exception as err:  # reported below, with the job
            errors.append((job, err))

    threads = [threading.Thread(target=serve, args=(seed, job)) for seed, job in enumerate(JOBS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for seed, job in enumerate(JOBS):
        assert np.array_equal(results[seed], alone[seed]), job
    # Every UNet call of both rounds counted once, whichever thread made it.
    assert agentsd.status(base).activity.calls == 2 * sum(steps for _, steps, _ in JOBS)


def test_each_thread_reads_the_phase_of_its_own_call():
    unet = agentsd.patch(tiny_unet("sd15"), min_tokens=0)
    context = torch.randn(2, 77, 32)
    seen, go = {}, threading.Barrier(2)

    def call(t):
        go.wait()
        with torch.no_grad():
            unet(torch.randn(2, 4, 16, 16), torch.tensor(t), encoder_hidden_states=context)
        go.wait()  # both calls made before either reads
        seen[t] = agentsd.current_phase(unet)

    threads = [threading.Thread(target=call, args=(t,)) for t in (981, 101)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {981: "agent", 101: "tome"}


@pytest.mark.parametrize("options, batch", [(dict(use_rand=False), 2), (dict(), 3)], ids=["fixed", "random"])
def test_validation_in_inference_mode_then_training(options, batch):
    unet = agentsd.patch(tiny_unet("sd15"), min_tokens=0, agent_steps=1.0, **options)
    sample, context = torch.randn(batch, 4, 16, 16), torch.randn(batch, 77, 32)
    with torch.inference_mode():
        unet(sample, torch.tensor(981), encoder_hidden_states=context)
    unet.train()
    loss = unet(sample, torch.tensor(981), encoder_hidden_states=context).sample.square().mean()
    loss.backward()
    assert unet.conv_in.weight.grad is not None and torch.isfinite(unet.conv_in.weight.grad).all()


def unet_output(unet, t=981, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample, context = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor(t), encoder_hidden_states=context).sample


def delegates(unet):
    return {name: type(_delegate_of(p)) for name, p in unet.attn_processors.items()}


def test_a_deep_copy_is_an_independent_patched_unet():
    original = agentsd.patch(tiny_unet("sd15"), min_tokens=0)
    baseline = agentsd.unpatch(copy.deepcopy(original))
    twin = copy.deepcopy(original)
    patched_out = unet_output(original)
    assert torch.equal(unet_output(twin), patched_out) and not torch.equal(unet_output(baseline), patched_out)

    before = delegates(original)
    patched = {n for n, p in original.attn_processors.items() if isinstance(p, AgentSDProcessor)}
    twin.set_default_attn_processor()  # the copy's own processors, not the original's
    assert delegates(original) == before
    assert set(delegates(twin).values()) == {AttnProcessor}
    assert patched and patched == {n for n, p in twin.attn_processors.items() if isinstance(p, AgentSDProcessor)}

    agentsd.unpatch(original)  # the copy stays patched
    assert agentsd.is_patched(twin) and not agentsd.is_patched(original)
    del original
    twin.set_default_attn_processor()  # works with the original gone
    agentsd.unpatch(twin)
    assert not any(isinstance(p, AgentSDProcessor) for p in twin.attn_processors.values())


def test_a_copied_pipeline_follows_its_own_scheduler():
    """DDIM with T = 500, 5 steps (t = 401, 301, ...): progress 1 - t / 500 is under 0.4 for the
    first two steps. Read against the original's T = 1000, no step would be in the agent phase."""
    from agentsd.api.status import recording_phases

    pipe = agentsd.patch(tiny_pipeline("sd15"), min_tokens=0)
    twin = copy.deepcopy(pipe)
    twin.scheduler = DDIMScheduler.from_config(twin.scheduler.config, num_train_timesteps=500)
    twin.set_progress_bar_config(disable=True)
    timesteps = []
    twin.unet.register_forward_pre_hook(lambda module, args: timesteps.append(float(args[1])))
    with recording_phases(twin) as phases:
        twin("a cube", num_inference_steps=5, height=64, width=64, output_type="latent")
    assert phases == ["agent" if 1 - t / 500 < 0.4 else "tome" for t in timesteps]
    assert phases[:2] == ["agent", "agent"]
    assert twin.unet is not pipe.unet and pipe.scheduler.config.num_train_timesteps == 1000


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_patched_unet_pickles_and_loads_back_patched(how):
    pipe = agentsd.patch(tiny_pipeline("sd15"), min_tokens=0)
    unet = pipe.unet
    expected = unet_output(unet)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(unet))
    else:
        buffer = io.BytesIO()
        torch.save(unet, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert agentsd.is_patched(loaded) and agentsd.patched_config(loaded) == agentsd.patched_config(unet)
    assert torch.equal(unet_output(loaded), expected)
    assert torch.equal(unet_output(loaded, t=101), unet_output(unet, t=101))  # both phases
    agentsd.unpatch(loaded)
    assert torch.equal(unet_output(loaded), unet_output(agentsd.unpatch(unet)))
    assert agentsd.is_patched(pipe) is False and not any(
        isinstance(p, AgentSDProcessor) for p in loaded.attn_processors.values()
    )


class ScaledProcessor(AttnProcessor2_0):
    """A custom processor with an argument of its own, passed through `cross_attention_kwargs`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, my_scale=1.0):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * my_scale


def test_a_custom_processor_still_gets_its_own_arguments(caplog):
    pipe = tiny_pipeline("sd15")
    pipe.unet.set_attn_processor(ScaledProcessor())
    pipe.set_progress_bar_config(disable=True)

    def generate(**kwargs):
        return pipe(
            "a cube", num_inference_steps=2, height=64, width=64, output_type="np",
            generator=torch.Generator().manual_seed(0), **kwargs,
        ).images  # fmt: skip

    scaled, plain = generate(cross_attention_kwargs={"my_scale": 0.5}), generate()
    assert not np.array_equal(scaled, plain)
    # A grid floor no image reaches: every attn1 call is handed to the custom processor.
    agentsd.patch(pipe, min_tokens=10**6)
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(generate(cross_attention_kwargs={"my_scale": 0.5}), scaled)
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]
