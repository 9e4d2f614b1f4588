"""`agentsd.api.caches`: step caches by name, and the count of the model calls a cache skipped,
checked against agentsd's own count (`status`, from its processors) on tiny Flux and Wan."""

import numpy as np
import pytest
import torch

import agentsd
from agentsd.api.caches import CACHES, cache_names, check_cache, counting_skips, enabled_cache, parse_cache
from agentsd.testing import tiny_pipeline

hooks = pytest.importorskip("diffusers.hooks", reason="this diffusers has no step caches")
tiny_flux = pytest.importorskip("agentsd.testing.tiny_flux", reason="this diffusers has no Flux")
tiny_wan = pytest.importorskip("agentsd.testing.tiny_wan", reason="this diffusers has no Wan")
if not hasattr(hooks, "TaylorSeerCacheConfig"):
    pytest.skip("diffusers' step caches with TaylorSeer come with diffusers 0.36", allow_module_level=True)

STEPS = 6
PATCH = {"flux": dict(min_tokens=0), "wan": dict(min_tokens=0, st=2)}


@pytest.fixture(scope="module")
def pipes():
    flux = tiny_pipeline("flux")
    wan = tiny_wan.tiny_wan_pipeline()
    for pipe in (flux, wan):
        pipe.transformer.eval()
        pipe.set_progress_bar_config(disable=True)
    return {"flux": flux, "wan": wan}


def generate(pipe, family):
    generator = torch.Generator().manual_seed(0)
    if family == "flux":
        args = dict(height=tiny_flux.SIZE, width=tiny_flux.SIZE, **tiny_flux.CALL_KWARGS["flux"])
        return pipe("a red cube", generator=generator, num_inference_steps=STEPS, output_type="np", **args).images
    args = tiny_wan.CALL_KWARGS["wan"]
    return pipe("a red cube", generator=generator, num_inference_steps=STEPS, output_type="np", **args).frames


def test_names_and_numbers():
    assert {"first-block", "taylorseer", "pyramid-attention-broadcast", "faster"} <= set(cache_names())
    assert parse_cache("first-block") == parse_cache("first-block:0.05")  # diffusers' own default
    assert parse_cache("taylorseer:3").value == 3 and parse_cache("taylorseer:3").label == "taylorseer:3"
    assert hooks.TaylorSeerCacheConfig().cache_interval == CACHES["taylorseer"].default
    assert hooks.FirstBlockCacheConfig().threshold == CACHES["first-block"].default
    for text, message in [("x", "unknown cache 'x'"), ("mag:-1", "must be positive"), ("faster:0", "whole number")]:
        with pytest.raises(ValueError, match=message):
            parse_cache(text)


# FirstBlockCache skips whole blocks; TaylorSeer's default mode on Flux replaces the attention
# modules' forwards (the blocks run); lite mode on Wan predicts whole blocks; Pyramid Attention
# Broadcast reuses attention outputs every other call within its timestep range.
@pytest.mark.parametrize(
    "family, cache",
    [
        ("flux", "first-block:0.5"),
        ("flux", "taylorseer:2"),
        ("wan", "taylorseer:2"),
        ("wan", "pyramid-attention-broadcast"),
    ],
)
def test_the_skipped_calls_counted_are_those_agentsd_counts(pipes, family, cache):
    pipe = pipes[family]
    baseline = generate(pipe, family)
    spec = parse_cache(cache)
    with enabled_cache(pipe, spec, STEPS), counting_skips(pipe) as alone:
        cache_only = generate(pipe, family)
    calls = STEPS * (2 if family == "wan" else 1)  # Wan's guidance: a model call of its own
    assert alone.calls == calls and 0 < alone.skipped < calls and alone.skip_fraction == alone.skipped / calls
    assert not np.array_equal(cache_only, baseline)

    with enabled_cache(pipe, spec, STEPS), agentsd.patched(pipe, **PATCH[family]), counting_skips(pipe) as stacked:
        generate(pipe, family)
        counted = agentsd.status(pipe).activity.cache_calls
    assert counted == {"computed": stacked.computed, "skipped": stacked.skipped} and stacked.skipped > 0

    # Off after the block: the model runs as before it, bit for bit, and no call counts any more.
    with counting_skips(pipe) as none:
        assert np.array_equal(generate(pipe, family), baseline)
    assert none.calls == calls and none.skipped == 0


def test_the_cache_comes_off_when_the_call_fails(pipes):
    pipe = pipes["flux"]
    baseline = generate(pipe, "flux")
    with pytest.raises(RuntimeError, match="stop"), enabled_cache(pipe, parse_cache("first-block:0.5"), STEPS):
        raise RuntimeError("stop")
    assert np.array_equal(generate(pipe, "flux"), baseline)


def test_a_model_without_enable_cache_or_a_cache_for_another_model_is_refused(pipes):
    with pytest.raises(ValueError, match="UNet2DConditionModel has no enable_cache"):
        check_cache(tiny_pipeline("sd15"), parse_cache("first-block"))
    with pytest.raises(ValueError, match="calibrated magnitude ratios"):
        check_cache(pipes["wan"], parse_cache("mag"))
    with pytest.raises(ValueError, match="model adapter"):
        check_cache(pipes["flux"], parse_cache("sea"))


def test_cache_dits_dbcache_by_name(pipes):
    pytest.importorskip("cache_dit", reason="cache-dit is not installed")
    pipe = pipes["flux"]
    baseline = generate(pipe, "flux")
    with enabled_cache(pipe, parse_cache("dbcache:0.5"), STEPS), counting_skips(pipe) as calls:
        generate(pipe, "flux")
    assert calls.calls == STEPS  # cache-dit warms up for 8 steps by default: no call skipped in 6
    assert np.array_equal(generate(pipe, "flux"), baseline)  # off again
